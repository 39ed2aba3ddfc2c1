"""Runtime: compile one signature's pair (`pair`), run generations (`generation`, `dispatch`), `backends/`.

`generation` is shared with loaded engines and imports no graph pass; `pair` and `dispatch` build on `graph/`.
"""
