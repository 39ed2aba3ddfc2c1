"""Exported graph -> the places it can be cut (`Cut`), found by per-architecture finders.

A `Cut` says what a full step keeps and what a cached step skips, as node names of the traced graph:

- *feature* cuts (DeepCache on U-Nets, `graph/branches.py`): the kept value is a node's own value (`h_main` at a
  skip connection); a cached step reads the kept value where the node was.
- *residual* cuts (block caches on transformers, `graph/blocks.py`): the kept value is a range of blocks' output
  minus its input, one entry per stream leaving the range; a cached step adds it to the range's freshly
  computed input.

Finders are registered in order (`register_finder`); `find_cuts` asks each in turn and returns the cuts of the
first that recognizes the graph. The partition (`partition.py`) knows nothing of the finders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from ..shapes import size_exprs

__all__ = ["Cut", "Stream", "CutNotFoundError", "find_cuts", "register_finder", "select_cut"]


class CutNotFoundError(ValueError):
    """No registered finder recognizes the graph."""


@dataclass(frozen=True)
class Stream:
    """One tensor a full step keeps.

    Attributes:
        node: the node a cached step does not compute (feature: the kept value itself; residual: the range's
            output for this stream).
        base: residual cuts only: the range's input of this stream (the kept value is `node - base`, and a
            cached step reads `base + kept` where it read `node`). None for feature cuts.
        shape: the kept tensor's shape for the traced signature (batch first).
        dtype: its dtype.
    """

    node: str
    base: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype


def example_shape(val: torch.Tensor) -> tuple[int, ...]:
    """A traced tensor's shape at the trace's example: symbolic sizes read as their example value without
    guarding on it (`int()` of a symbolic size would fix the symbol to that value for the whole trace)."""
    return tuple(s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in val.shape)


def same_sizes(a, b) -> bool:
    """Whether two traced shapes are the same sizes, symbolic ones compared as expressions: `==` on symbolic
    sizes would guard the trace on the answer (equal example sizes would become one symbol, or a constant)."""
    return len(a) == len(b) and size_exprs(a) == size_exprs(b)


@dataclass(frozen=True)
class Cut:
    """Where to cut a traced model and what a full step keeps.

    Attributes:
        index: the number users pass as `branch=` (U-Net: the deepest recomputed skip; transformer: the last
            computed leading block).
        streams: what a full step keeps, one entry per tensor (several streams are packed into one cache tensor
            of shape `(batch, sum of the per-row sizes)`).
        probe: a node every step computes whose step-to-step drift tracks the kept value's (adaptive refresh).
        probe_base: None, or a node the probe is measured against: the refresh policies then see
            `probe - probe_base` (a transformer's computed leading blocks' residual, as first-block caches
            compare it between steps).
        consumer: a node every step computes that reads the kept value (checked to survive the cut).
        producer_module: label: the module whose output is the probe, e.g. `down_blocks.0.attentions.1`.
        consumer_module: label: where the kept value is read, e.g. `up_blocks.3.resnets.1` or `blocks [1, 28)`.
    """

    index: int
    streams: tuple[Stream, ...]
    probe: str
    consumer: str
    producer_module: str
    consumer_module: str
    probe_base: str | None = None

    @property
    def kind(self) -> str:
        """"feature" (the value is kept) or "residual" (output minus input of a range is kept)."""
        return "feature" if self.streams[0].base is None else "residual"

    @property
    def cache_shape(self) -> tuple[int, ...]:
        """The cache tensor's shape: the one stream's, or `(batch, sum of per-row sizes)` for several."""
        if len(self.streams) == 1:
            return self.streams[0].shape
        batch = self.streams[0].shape[0]
        return (batch, sum(_per_row(s.shape) for s in self.streams))

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.streams[0].dtype


def _per_row(shape: tuple[int, ...]) -> int:
    size = 1
    for s in shape[1:]:
        size *= s
    return size


Finder = Callable[..., tuple[Cut, ...]]
_FINDERS: list[tuple[str, Finder]] = []


def register_finder(name: str, finder: Finder) -> None:
    """Adds a cut finder `finder(gm, **options) -> cuts`; it returns () for a graph it does not recognize."""
    _FINDERS[:] = [(n, f) for n, f in _FINDERS if n != name] + [(name, finder)]


def find_cuts(gm: fx.GraphModule, **options) -> tuple[Cut, ...]:
    """The cuts of a traced model from the first registered finder that recognizes it.

    Example:
        >>> [c.index for c in find_cuts(traced.gm)][:3]
        [0, 1, 2]
    """
    looked_for = []
    for name, finder in _FINDERS:
        cuts = finder(gm, **options)
        if cuts:
            return cuts
        looked_for.append(f"{name} ({finder.__doc__.strip().splitlines()[0]})")
    raise CutNotFoundError("no cut found in this model's graph. Looked for: " + "; ".join(looked_for) + ". "
                           "DeepCache caches a U-Net's deep feature or a transformer's middle blocks; another "
                           "architecture needs a finder of its own (graph.cuts.register_finder).")


def select_cut(cuts: tuple[Cut, ...], branch: int) -> Cut:
    by_index = {cut.index: cut for cut in cuts}
    if branch not in by_index:
        model = "U-Net" if cuts[0].kind == "feature" else "transformer"
        raise ValueError(
            f"branch={branch} is out of range for this {model}: valid branches are 0..{len(cuts) - 1} "
            f"(see list_branches({'unet' if model == 'U-Net' else 'model'}))"
        )
    return by_index[branch]


def module_path(node: fx.Node, depth: int = 2) -> str:
    """The module that computed `node`, `depth` levels below the root (`up_blocks.3.resnets.1` at 2)."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    # The stack starts with the export root ("") and the wrapper module "unet" (see trace._FlatUNet).
    paths = [p.removeprefix("unet.") for p in paths if p not in ("", "unet")]
    if not paths:
        return node.name
    return paths[min(depth, len(paths)) - 1]
