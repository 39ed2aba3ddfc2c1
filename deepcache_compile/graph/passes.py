"""The graph passes, one ordered list, applied the same way by compile (`runtime/pair.py`) and export
(`artifacts/export.py`) to every graph of a split, named by its part ("full", "shallow", "head", "deep", "tail").

1. `forecast`: the graphs that read the cache ("shallow", "tail") take `(slope, steps)` and read the extrapolated
   cache (`partition.add_forecast`).
2. `attention`: bf16 SDPA calls on the project's CPU kernel where it can run (`attention.with_native_attention`),
   for the backends and formats that take the `attention` option ("auto" by default there), off elsewhere.

Example:
    >>> gm = apply_passes(split.shallow, "shallow", PassOptions(forecast=True, attention="auto", who="export"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx

from .attention import with_native_attention
from .partition import add_forecast

__all__ = ["PASSES", "PassOptions", "apply_passes"]

CACHE_READERS = ("shallow", "tail")


@dataclass(frozen=True)
class PassOptions:
    """What the passes do for one compile or export.

    Attributes:
        forecast: extrapolate the cache on cached steps (the config's `forecast`).
        attention: "auto", "native" or "sdpa"; None where the backend or format takes no such option.
        who: names the caller in errors ("the inductor backend", "the aoti export").
    """

    forecast: bool = False
    attention: str | None = None
    who: str = ""


def _forecast(gm: fx.GraphModule, part: str, options: PassOptions) -> fx.GraphModule:
    return add_forecast(gm) if options.forecast and part in CACHE_READERS else gm


def _attention(gm: fx.GraphModule, part: str, options: PassOptions) -> fx.GraphModule:
    return gm if options.attention is None else with_native_attention(gm, options.attention, options.who)


PASSES: tuple[Callable[[fx.GraphModule, str, PassOptions], fx.GraphModule], ...] = (_forecast, _attention)


def apply_passes(gm: fx.GraphModule, part: str, options: PassOptions) -> fx.GraphModule:
    """`gm` after every pass of `PASSES`, in order (each returns its input unchanged where it does not apply)."""
    for graph_pass in PASSES:
        gm = graph_pass(gm, part, options)
    return gm
