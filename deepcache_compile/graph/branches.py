"""Exported U-Net graph -> its ordered skip connections (the DeepCache branches).

A skip connection is found from the graph alone: a concatenation of two rank>=4 tensors along the channel
dimension, where one input (`h_main`) was computed later than the other (`h_skip`, kept from the down path).
Skips are numbered by the execution order of their producers (skip 0 = conv_in output); U-Net nesting means
their consumers run in the reverse order, which is checked. Module paths from `nn_module_stack` are used
only to label the branches for people.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

logger = logging.getLogger(__name__)

__all__ = ["SkipBranch", "find_branches", "downsampling_factor", "BranchNotFoundError"]

_CAT_TARGETS = (torch.ops.aten.cat.default, torch.ops.aten.concat.default)


class BranchNotFoundError(ValueError):
    """The graph has no U-Net skip structure DeepCache can cut at."""


@dataclass(frozen=True)
class SkipBranch:
    """One skip connection of a traced U-Net.

    Attributes:
        index: the branch number (0 = conv_in output, increasing with depth).
        producer: graph node that produces the skip tensor (`h_skip`).
        consumer: the concatenation node that joins `h_main` and `h_skip`.
        cached: graph node of `h_main`, the tensor a full step keeps for the shallow steps.
        cache_shape: shape of the cached tensor for the traced signature.
        cache_dtype: its dtype.
        producer_module: module that computes the skip tensor, e.g. `down_blocks.0.attentions.1`.
        consumer_module: up layer that consumes it, e.g. `up_blocks.3.resnets.1`.
    """

    index: int
    producer: str
    consumer: str
    cached: str
    cache_shape: tuple[int, ...]
    cache_dtype: torch.dtype
    producer_module: str
    consumer_module: str


def find_branches(gm: fx.GraphModule) -> tuple[SkipBranch, ...]:
    """Returns the skip branches of a traced U-Net, outermost first.

    Example:
        >>> [b.producer_module for b in find_branches(traced.gm)][:2]
        ['conv_in', 'down_blocks.0.attentions.0']
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    joins = []
    for node in gm.graph.nodes:
        pair = _skip_pair(node)
        if pair is not None:
            main, skip = sorted(pair, key=order.__getitem__, reverse=True)
            joins.append((skip, main, node))
    if not joins:
        raise BranchNotFoundError(
            "no skip connections found: DeepCache needs a U-Net whose up layers concatenate a skip tensor along "
            "the channel dimension (torch.cat([h, skip], dim=1)); this graph has none."
        )
    joins.sort(key=lambda j: order[j[0]])
    _check_nesting(joins, order)
    return tuple(_branch(i, skip, main, cat) for i, (skip, main, cat) in enumerate(joins))


def downsampling_factor(branches: tuple[SkipBranch, ...], sample_height: int) -> int:
    """How many sample pixels one pixel of the deepest skip spans (8 for SD 1.x: heights must be multiples)."""
    return sample_height // min(b.cache_shape[-2] for b in branches)


def _skip_pair(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if node.op != "call_function" or node.target not in _CAT_TARGETS:
        return None
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(tensors) != 2 or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    vals = [t.meta.get("val") for t in tensors]
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 4 for v in vals):
        return None
    return tuple(tensors) if dim % vals[0].dim() == 1 else None


def _check_nesting(joins: list, order: dict) -> None:
    producers = [j[0] for j in joins]
    consumers = [order[j[2]] for j in joins]
    if len(set(producers)) != len(producers) or consumers != sorted(consumers, reverse=True):
        raise BranchNotFoundError(
            "the channel concatenations in this graph are not nested like U-Net skip connections (the deepest "
            "skip must be consumed first); DeepCache cannot choose a cut. Found skips produced by "
            f"{[_module_path(p) for p in producers]}."
        )


def _branch(index: int, skip: fx.Node, main: fx.Node, cat: fx.Node) -> SkipBranch:
    val = main.meta["val"]
    layer = next(iter(cat.users), cat)
    return SkipBranch(
        index=index,
        producer=skip.name,
        consumer=cat.name,
        cached=main.name,
        cache_shape=tuple(int(s) for s in val.shape),
        cache_dtype=val.dtype,
        producer_module=_module_path(skip),
        consumer_module=_module_path(layer),
    )


def _module_path(node: fx.Node) -> str:
    """The U-Net layer that computed `node`: a child of a top-level block (`up_blocks.3.resnets.1`)."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    # The stack starts with the export root ("") and the wrapper module "unet" (see trace._FlatUNet).
    paths = [p.removeprefix("unet.") for p in paths if p not in ("", "unet")]
    if not paths:
        return node.name
    return paths[1] if len(paths) > 1 else paths[0]
