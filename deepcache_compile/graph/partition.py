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

import torch
from torch import fx

from .branches import SkipBranch

logger = logging.getLogger(__name__)

__all__ = ["SplitGraphs", "ThreeGraphs", "split_at_branch", "split_three", "add_forecast", "prune_dead_nodes"]


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


@dataclass(frozen=True)
class ThreeGraphs:
    """The head, deep and tail graphs of one branch: a full step is head -> deep -> tail, a shallow step
    head -> tail, so no layer runs twice or in vain.

    Graph invariants (checked by `check_three`):
    - head: `(*inputs) -> (*links)`: the layers a shallow step runs before it needs the cache (embeddings,
      conv_in, the down layers up to skip b); `links` are the head's tensors that the other two consume.
    - deep: `(*inputs, *links) -> (cache,)`: everything that produces the cache and nothing a shallow step runs.
    - tail: `(*inputs, *links, cache) -> (sample,)`: the layers that consume the cache, down to the output.
    Every node of the traced U-Net lands in exactly one of them (parameters are shared, never copied).

    Attributes:
        branch: the skip branch the graphs are cut at.
        head, deep, tail: the graph modules.
        links: the traced U-Net's node names the head outputs, in graph order.
        probe: the index in `links` of the deepest recomputed skip (skip b, the adaptive refresh's probe).
    """

    branch: SkipBranch
    head: fx.GraphModule
    deep: fx.GraphModule
    tail: fx.GraphModule
    links: tuple[str, ...]
    probe: int


def split_three(root: fx.GraphModule, branch: SkipBranch) -> ThreeGraphs:
    """Cuts a traced U-Net at `branch` into head, deep and tail graphs (see `ThreeGraphs`).

    The partition is a function from node to part, decided from the graph alone: tail nodes depend on the
    cached node and feed the output; head nodes feed the output without depending on it; deep nodes are the
    cached node's other ancestors. It holds for any graph with one cached node, a U-Net or a transformer stack.

    Example:
        >>> three = split_three(traced.gm, find_branches(traced.gm)[1])
        >>> links = three.head(*inputs)
        >>> (cache,) = three.deep(*inputs, *links)
        >>> torch.equal(three.tail(*inputs, *links, cache)[0], unet(**call).sample)
        True
    """
    part = _assign_parts(root, _node(root, branch.cached))
    consumers = {"deep", "tail"}
    links = tuple(n.name for n in root.graph.nodes
                  if part.get(n) == "head" and any(part.get(u) in consumers for u in n.users))
    head = _extract(root, part, "head", (), links, "DeepCacheHead")
    deep = _extract(root, part, "deep", links, (branch.cached,), "DeepCacheDeep")
    tail = _extract(root, part, "tail", (*links, branch.cached), _output_names(root), "DeepCacheTail",
                    rename={branch.cached: "cache"})
    three = ThreeGraphs(branch=branch, head=head, deep=deep, tail=tail, links=links,
                        probe=links.index(branch.producer))
    check_three(three, len(part))
    logger.info("branch %d: head %d, deep %d, tail %d nodes; %d links",
                branch.index, *(len(g.graph.nodes) for g in (head, deep, tail)), len(links))
    return three


def _node(root: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in root.graph.nodes if n.name == name)


def _assign_parts(root: fx.GraphModule, cached: fx.Node) -> dict[fx.Node, str]:
    """Every computing node the output needs -> "head", "deep" or "tail" (placeholders and parameters get no
    part: each graph has its own)."""
    needed: set[fx.Node] = set()
    stack = list(root.graph.output_node().all_input_nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    after_cache: set[fx.Node] = set()
    for node in root.graph.nodes:  # topological order: inputs come before their users
        if node in needed and any(arg is cached or arg in after_cache for arg in node.all_input_nodes):
            after_cache.add(node)
    part: dict[fx.Node, str] = {}
    for node in reversed(root.graph.nodes):  # users come before their inputs
        if node not in needed or node.op in ("placeholder", "get_attr"):
            continue
        users = [part.get(u, "head") for u in node.users if u in needed or u.op == "output"]
        if node in after_cache:
            part[node] = "tail"
        elif node is cached or set(users) == {"deep"}:
            part[node] = "deep"
        else:
            part[node] = "head"
    return part


def _output_names(root: fx.GraphModule) -> tuple[str, ...]:
    return tuple(n.name for n in root.graph.output_node().args[0])


def _extract(root: fx.GraphModule, part: dict[fx.Node, str], which: str, extra_inputs: tuple[str, ...],
             outputs: tuple[str, ...], class_name: str, rename: dict[str, str] | None = None) -> fx.GraphModule:
    """The graph of the `which` part: the root's placeholders, then one per name in `extra_inputs` (named as
    in the root, or by `rename`); returns the named nodes. Parameters are `get_attr` nodes on the shared root."""
    graph, env = fx.Graph(), {}
    for node in root.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node)
    by_name = {n.name: n for n in root.graph.nodes}
    for name in extra_inputs:
        env[by_name[name]] = graph.placeholder((rename or {}).get(name, name))
        env[by_name[name]].meta = dict(by_name[name].meta)
    for node in root.graph.nodes:
        if node in env or node.op == "output" or (node.op != "get_attr" and part.get(node) != which):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[by_name[name]] for name in outputs))
    prune_dead_nodes(graph)
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name)


def check_three(three: ThreeGraphs, computing_nodes: int) -> None:
    """Checks the `ThreeGraphs` invariants; raises RuntimeError if one fails."""
    def computing(gm):
        return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output"))

    counted = sum(computing(g) for g in (three.head, three.deep, three.tail))
    if counted != computing_nodes:
        raise RuntimeError(f"head, deep and tail hold {counted} computing nodes, the U-Net {computing_nodes}: "
                           "a node was dropped or duplicated by the cut")
    consumer = three.branch.consumer
    if not any(n.name == consumer for n in three.tail.graph.nodes):
        raise RuntimeError(f"the tail lost the skip consumer {consumer}: the cut is not above the cache")


def add_forecast(gm: fx.GraphModule) -> fx.GraphModule:
    """`(*inputs, cache) -> out` becomes `(*inputs, cache, slope, steps) -> out`, which reads
    `cache + slope * steps` wherever it read `cache`: a first-order extrapolation of the cached feature (as
    TaylorSeer does for transformer features), fused by the backend into the graph's first use of the cache.
    `steps = 0` gives the plain reuse back exactly (for finite `slope`). The graph is copied; `gm` is unchanged.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    cache = next(n for n in graph.find_nodes(op="placeholder") if n.target == "cache")
    with graph.inserting_after(cache):
        slope = graph.placeholder("cache_slope")
    with graph.inserting_after(slope):
        steps = graph.placeholder("cache_steps")
    slope.meta = dict(cache.meta)
    with graph.inserting_after(steps):
        scaled = graph.call_function(torch.ops.aten.mul.Tensor, (slope, steps))
    with graph.inserting_after(scaled):
        forecast = graph.call_function(torch.ops.aten.add.Tensor, (cache, scaled))
    scaled.meta, forecast.meta = dict(cache.meta), dict(cache.meta)
    cache.replace_all_uses_with(forecast, delete_user_cb=lambda user: user is not forecast)
    graph.output(output)
    graph.lint()
    logger.info("forecast: %s reads cache + slope * steps", type(gm).__name__)
    return fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Forecast")
