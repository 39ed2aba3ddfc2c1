"""Exported U-Net graph -> its ordered skip connections (the DeepCache branches), as feature `Cut`s.

A skip connection is found from the graph alone: a concatenation of two rank>=4 tensors along the channel
dimension, where one input (`h_main`) was computed later than the other (`h_skip`, kept from the down path).
Skips are numbered by the execution order of their producers (skip 0 = conv_in output); U-Net nesting means
their consumers run in the reverse order, which is checked. Module paths from `nn_module_stack` are used
only to label the branches for people.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from .cuts import Cut, CutNotFoundError, Stream, example_shape, module_path, register_finder

logger = logging.getLogger(__name__)

__all__ = ["find_branches", "find_skip_cuts", "downsampling_factor", "BranchNotFoundError"]

_CAT_TARGETS = (torch.ops.aten.cat.default, torch.ops.aten.concat.default)


class BranchNotFoundError(CutNotFoundError):
    """The graph has no U-Net skip structure DeepCache can cut at."""


def find_branches(gm: fx.GraphModule) -> tuple[Cut, ...]:
    """Returns the skip branches of a traced U-Net, outermost first, as feature cuts: the kept stream is
    `h_main`, the probe the skip tensor (`h_skip`), the consumer the concatenation.

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


def find_skip_cuts(gm: fx.GraphModule, **options) -> tuple[Cut, ...]:
    """U-Net skip connections: channel concatenations of two rank>=4 tensors, nested."""
    if not any(_skip_pair(node) for node in gm.graph.nodes):
        return ()
    try:
        return find_branches(gm)
    except BranchNotFoundError as err:  # concatenations that are no skips (joint attention): another finder's
        logger.debug("not a U-Net: %s", err)
        return ()


register_finder("unet-skips", find_skip_cuts)


def downsampling_factor(branches: tuple[Cut, ...], sample_height: int) -> int:
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
            f"{[module_path(p) for p in producers]}."
        )


def _branch(index: int, skip: fx.Node, main: fx.Node, cat: fx.Node) -> Cut:
    val = main.meta["val"]
    layer = next(iter(cat.users), cat)
    return Cut(
        index=index,
        streams=(Stream(main.name, None, example_shape(val), val.dtype),),
        probe=skip.name,
        consumer=cat.name,
        producer_module=module_path(skip),
        consumer_module=module_path(layer),
    )
