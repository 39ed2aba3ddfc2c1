"""The soak (`bench/soak.py` runs 1,000 generations) in short: random sizes, batch sizes, step counts and
schedules on a static and a dynamic pair of the digits model, threads on and off, NaN inputs mixed in."""

from __future__ import annotations

import pytest

from deepcache_compile.eval.soak import MAX_SIGNATURES, draw_jobs, run_soak


def test_jobs_cover_what_the_soak_promises():
    jobs = draw_jobs(400, ("eager", "eager-dynamic"), seed=0)
    assert {j.backend for j in jobs} == {"eager", "eager-dynamic"}
    assert {j.batch for j in jobs} == {1, 2, 3, 4} and len({(j.height, j.width) for j in jobs}) == 25
    assert {j.schedule.kind for j in jobs} == {"uniform", "nonuniform"} and 0 < sum(j.broken for j in jobs) < 20
    # More static signatures than the LRU holds, so that the soak evicts and compiles again.
    assert len({(j.batch, j.height, j.width) for j in jobs if j.backend == "eager"}) > MAX_SIGNATURES


@pytest.mark.filterwarnings("ignore")
def test_short_soak():
    report = run_soak(48, backends=("eager", "eager-dynamic"), seed=1, warmup=0.5, broken_share=0.1, progress=False)
    assert report.generations == 48 and report.threaded > 0 and report.broken_refused > 0
    assert report.mismatches == [] and report.errors == []
    assert report.most_pairs == {"eager": MAX_SIGNATURES, "eager-dynamic": 1}
    assert not [name for name in report.temp_left if name.startswith("deepcache")]
    assert report.rss_growth < 0.05, report.rss_trace_mb
