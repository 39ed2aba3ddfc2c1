"""Traced U-Net + branch -> full graph (also returns the cache) and shallow graph (takes the cache).

Both graphs are built from one root GraphModule with `GraphModule(root, graph)`, so they share the root's
parameter objects, which are the U-Net's own: no weight is copied.

Graph invariants (checked by `check_split`):
- full:    `(*inputs) -> (sample, cache)`; `cache` is the branch's `h_main` node.
- shallow: `(*inputs, cache) -> (sample,)`; its `cache` placeholder has exactly the shape and dtype of the full
  graph's cache output, and it holds no node that the output does not need (no deep layer survives, whatever
  fx thinks of the purity of dropout, attention or assertion ops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx

from .branches import SkipBranch

logger = logging.getLogger(__name__)

__all__ = ["SplitGraphs", "split_at_branch", "prune_dead_nodes"]


@dataclass(frozen=True)
class SplitGraphs:
    """The pair of graphs for one branch.

    Attributes:
        branch: the skip branch the graphs are cut at.
        full: `(*inputs) -> (sample, cache)`.
        shallow: `(*inputs, cache) -> (sample,)`.
    """

    branch: SkipBranch
    full: fx.GraphModule
    shallow: fx.GraphModule


def split_at_branch(root: fx.GraphModule, branch: SkipBranch) -> SplitGraphs:
    """Cuts a traced U-Net at `branch` into its full and shallow graphs.

    Example:
        >>> split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
        >>> sample, cache = split.full(*inputs)
        >>> torch.equal(split.shallow(*inputs, cache)[0], sample)
        True
    """
    full = _build(root, branch, shallow=False)
    shallow = _build(root, branch, shallow=True)
    split = SplitGraphs(branch=branch, full=full, shallow=shallow)
    check_split(split)
    logger.info(
        "branch %d: full graph %d nodes, shallow graph %d nodes, cache %s",
        branch.index, len(full.graph.nodes), len(shallow.graph.nodes), branch.cache_shape,
    )
    return split


def _build(root: fx.GraphModule, branch: SkipBranch, shallow: bool) -> fx.GraphModule:
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(root.graph, val_map)
    by_name = {old.name: new for old, new in val_map.items()}
    cached = by_name[branch.cached]
    if shallow:
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last_input):
            cache = graph.placeholder("cache")
        cache.meta = dict(cached.meta)
        cached.replace_all_uses_with(cache)
        graph.output(tuple(outputs))
    else:
        graph.output((*outputs, cached))
    prune_dead_nodes(graph)
    graph.lint()
    return fx.GraphModule(root, graph, class_name="DeepCacheShallow" if shallow else "DeepCacheFull")


def prune_dead_nodes(graph: fx.Graph) -> int:
    """Removes every node the output does not depend on, impure ones included; returns how many.

    Placeholders stay, so both graphs keep the same inputs.

    fx's own `eliminate_dead_code` keeps dropout, attention and assertion nodes because it deems them impure;
    a shallow graph that keeps them still computes the deep layers.
    """
    before = len(graph.nodes)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
    return before - len(graph.nodes)


def check_split(split: SplitGraphs) -> None:
    """Checks the graph invariants stated in this module's docstring; raises RuntimeError if one fails."""
    full_out = split.full.graph.output_node().args[0]
    cache_in = [n for n in split.shallow.graph.nodes if n.op == "placeholder"][-1]
    full_cache, shallow_cache = full_out[-1].meta.get("val"), cache_in.meta.get("val")
    if full_cache is None or shallow_cache is None:
        raise RuntimeError("partition lost the cached tensor's metadata")
    if full_cache.shape != shallow_cache.shape or full_cache.dtype != shallow_cache.dtype:
        raise RuntimeError(
            f"shallow cache input {tuple(shallow_cache.shape)}/{shallow_cache.dtype} does not match the full "
            f"graph's cache output {tuple(full_cache.shape)}/{full_cache.dtype}"
        )
    consumer = split.branch.consumer
    if not any(n.name == consumer for n in split.shallow.graph.nodes):
        raise RuntimeError(f"shallow graph lost the skip consumer {consumer}: the cut is not above the cache")
