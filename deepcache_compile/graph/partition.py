"""Traced model + `Cut` -> the graphs a cached generation runs: the full/shallow pair and head/deep/tail.

One algorithm makes all five. `assign_parts` maps every node the output needs to "head" (computed on every
step before the kept value is needed), "deep" (computed only to produce the kept value) or "tail" (reads the
kept value); `_emit` copies the nodes of some parts into a new graph, reading the cache where the cut's
nodes were (a feature: the cache itself; a residual: the stream's input plus its cached residual) or
appending the computation of the cache. All graphs are `GraphModule(root, graph)`: they share the root's
parameter objects, which are the model's own.

Graph invariants (checked by `check_split` and `check_three`):
- full:    `(*inputs) -> (sample, cache)`: the traced graph itself plus the cache output.
- shallow: `(*inputs, cache) -> (sample,)` = head + tail; its `cache` placeholder has exactly the shape and
  dtype of the full graph's cache output, and it holds no node that the output does not need (no deep layer
  survives, whatever fx thinks of the purity of dropout, attention or assertion ops).
- head: `(*inputs) -> (*links)`; deep: `(*inputs, *links) -> (cache,)`; tail: `(*inputs, *links, cache) ->
  (sample,)`. Every computing node of the traced graph lands in exactly one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import fx

from .cuts import Cut

logger = logging.getLogger(__name__)

__all__ = ["SplitGraphs", "ThreeGraphs", "split_at_branch", "split_three", "add_forecast", "cache_value",
           "prune_dead_nodes", "assign_parts"]


@dataclass(frozen=True)
class SplitGraphs:
    """The pair of graphs for one cut.

    Attributes:
        branch: the cut the graphs are made at.
        full: `(*inputs) -> (sample, cache)`.
        shallow: `(*inputs, cache) -> (sample,)`.
    """

    branch: Cut
    full: fx.GraphModule
    shallow: fx.GraphModule


@dataclass(frozen=True)
class ThreeGraphs:
    """The head, deep and tail graphs of one cut: a full step is head -> deep -> tail, a shallow step
    head -> tail, so no layer runs twice or in vain.

    Attributes:
        branch: the cut the graphs are made at.
        head, deep, tail: the graph modules (see the module docstring for their signatures).
        links: the traced graph's node names the head outputs, in graph order.
        probe: the index in `links` of the cut's probe node (the adaptive refresh's signal).
    """

    branch: Cut
    head: fx.GraphModule
    deep: fx.GraphModule
    tail: fx.GraphModule
    links: tuple[str, ...]
    probe: int


def split_at_branch(root: fx.GraphModule, cut: Cut) -> SplitGraphs:
    """Cuts a traced model at `cut` into its full and shallow graphs.

    Example:
        >>> split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
        >>> sample, cache = split.full(*inputs)
        >>> torch.equal(split.shallow(*inputs, cache)[0], sample)
        True
    """
    part = assign_parts(root, cut)
    outputs = _output_names(root)
    full = _emit(root, part, {"head", "deep", "tail"}, outputs, cut, keep=True, name="DeepCacheFull")
    shallow = _emit(root, part, {"head", "tail"}, outputs, cut, restore=True, name="DeepCacheShallow")
    split = SplitGraphs(branch=cut, full=full, shallow=shallow)
    check_split(split)
    logger.info("cut %d: full graph %d nodes, shallow graph %d nodes, cache %s",
                cut.index, len(full.graph.nodes), len(shallow.graph.nodes), cut.cache_shape)
    return split


def split_three(root: fx.GraphModule, cut: Cut) -> ThreeGraphs:
    """Cuts a traced model at `cut` into head, deep and tail graphs (see `ThreeGraphs`).

    Example:
        >>> three = split_three(traced.gm, find_branches(traced.gm)[1])
        >>> links = three.head(*inputs)
        >>> (cache,) = three.deep(*inputs, *links)
        >>> torch.equal(three.tail(*inputs, *links, cache)[0], unet(**call).sample)
        True
    """
    if cut.probe_base is not None:
        root, cut = _with_residual_probe(root, cut)
    part = assign_parts(root, cut)
    part[_node(root, cut.probe)] = "head"  # a residual probe: no other node needs it
    bases = {s.base for s in cut.streams if s.base is not None}
    links = tuple(n.name for n in root.graph.nodes if part.get(n) == "head" and not _input_size(n) and (
        n.name in bases or n.name == cut.probe or any(part.get(u) in ("deep", "tail") for u in n.users)))
    head = _emit(root, part, {"head"}, links, cut, name="DeepCacheHead")
    deep = _emit(root, part, {"deep"}, (), cut, links=links, keep=True, name="DeepCacheDeep")
    tail = _emit(root, part, {"tail"}, _output_names(root), cut, links=links, restore=True, name="DeepCacheTail")
    three = ThreeGraphs(branch=cut, head=head, deep=deep, tail=tail, links=links, probe=links.index(cut.probe))
    check_three(three, len(part))
    logger.info("cut %d: head %d, deep %d, tail %d nodes; %d links",
                cut.index, *(len(g.graph.nodes) for g in (head, deep, tail)), len(links))
    return three


def _with_residual_probe(root: fx.GraphModule, cut: Cut) -> tuple[fx.GraphModule, Cut]:
    """A copy of `root` with a node `probe - probe_base` after the probe, and the cut with it as its probe."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(root.graph, env))
    by_name = {n.name: n for n in graph.nodes}
    probe, base = by_name[cut.probe], by_name[cut.probe_base]
    with graph.inserting_after(probe):
        residual = _call(graph, torch.ops.aten.sub.Tensor, probe, base)
    residual.meta.pop("deepcache_added")  # a node of the model's graph now, counted with the others
    return fx.GraphModule(root, graph), replace(cut, probe=residual.name, probe_base=None)


def assign_parts(root: fx.GraphModule, cut: Cut) -> dict[fx.Node, str]:
    """Every computing node the output needs -> "head", "deep" or "tail" (placeholders and parameters get no
    part: each graph has its own). Tail nodes read a cut node (directly or through other tail nodes); deep
    nodes are the cut nodes and their ancestors that nothing else needs; head nodes are the rest."""
    cut_nodes = {_node(root, s.node) for s in cut.streams}
    bases = {_node(root, s.base) for s in cut.streams if s.base is not None}  # a cached step adds to them
    needed: set[fx.Node] = set()
    stack = list(root.graph.output_node().all_input_nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    after_cut: set[fx.Node] = set()
    for node in root.graph.nodes:  # topological order: inputs come before their users
        if node in needed and any(arg in cut_nodes or arg in after_cut for arg in node.all_input_nodes):
            after_cut.add(node)
    part: dict[fx.Node, str] = {}
    for node in reversed(root.graph.nodes):  # users come before their inputs
        if node not in needed or node.op in ("placeholder", "get_attr"):
            continue
        users = [part.get(u, "head") for u in node.users if u in needed or u.op == "output"]
        if node in after_cut:
            part[node] = "tail"
        elif node in bases:
            part[node] = "head"
        elif node in cut_nodes or (users and set(users) == {"deep"}):
            part[node] = "deep"
        else:
            part[node] = "head"
    return part


def _emit(root: fx.GraphModule, part: dict[fx.Node, str], parts: set[str], outputs: tuple[str, ...], cut: Cut,
          links: tuple[str, ...] = (), keep: bool = False, restore: bool = False, name: str = "") -> fx.GraphModule:
    """A graph of the nodes of `parts`: the root's placeholders, one per link, and where `restore` a `cache`
    placeholder that the cut's nodes read instead of being computed; returns the named `outputs`, then the
    cache where `keep`."""
    graph, env = fx.Graph(), {}
    by_name = {n.name: n for n in root.graph.nodes}
    for node in root.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node)
    for link in links:
        env[by_name[link]] = graph.placeholder(link)
        env[by_name[link]].meta = dict(by_name[link].meta)
    cache = None
    if restore:
        cache = graph.placeholder("cache")
        cache.meta["val"] = cache_value(root, cut)
    cut_nodes = {by_name[s.node]: i for i, s in enumerate(cut.streams)}
    for node in root.graph.nodes:
        if node in env or node.op == "output":
            continue
        if cache is not None and node in cut_nodes:  # topological order: every stream's base is copied by now
            env[node] = _restored(graph, cut, cut_nodes[node], cache, env, by_name)
        elif node.op == "get_attr" or part.get(node) in parts or _input_size(node):
            env[node] = graph.node_copy(node, lambda n: env[n])  # a size read: each graph reads its own input
    results = [env[by_name[n]] for n in outputs]
    if keep:
        results.append(_keep(graph, cut, env, by_name))
    graph.output(tuple(results))
    prune_dead_nodes(graph)
    graph.lint()
    return fx.GraphModule(root, graph, class_name=name)


def _input_size(node: fx.Node) -> bool:
    """A symbolic size of a graph input (dynamic traces): every graph that needs it reads it from its own copy
    of the input, instead of receiving it as a link (an int output would make a graph's interface symbolic)."""
    return (node.op == "call_function" and node.target is torch.ops.aten.sym_size.int
            and node.args[0].op == "placeholder")


def _keep(graph: fx.Graph, cut: Cut, env: dict, by_name: dict) -> fx.Node:
    """Appends the cache's computation: each stream's value (feature) or its node minus its base (residual),
    packed into one tensor where there are several streams."""
    kept = []
    for stream in cut.streams:
        value = env[by_name[stream.node]]
        if stream.base is not None:
            value = _call(graph, torch.ops.aten.sub.Tensor, value, env[by_name[stream.base]])
        kept.append(value)
    return kept[0] if len(kept) == 1 else _call(graph, pack_streams, *kept)


def _restored(graph: fx.Graph, cut: Cut, index: int, cache: fx.Node, env: dict, by_name: dict) -> fx.Node:
    """What a cached step reads where stream `index`'s node was: its part of the cache (plus its base)."""
    value = cache
    if len(cut.streams) > 1:
        likes = [env[by_name[s.base or s.node]] for s in cut.streams] if cut.kind == "residual" else None
        if likes is None:
            raise NotImplementedError("several feature streams in one cut: pack them by their own shapes")
        value = _call(graph, unpack_stream, cache, index, *likes)
    stream = cut.streams[index]
    if stream.base is not None:
        value = _call(graph, torch.ops.aten.add.Tensor, env[by_name[stream.base]], value)
    return value


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """A node the cut adds (marked `deepcache_added`), with its value's metadata computed on fake tensors."""
    node = graph.call_function(target, args)
    node.meta["val"] = target(*(a.meta["val"] if isinstance(a, fx.Node) else a for a in args))
    node.meta["deepcache_added"] = True
    return node


def pack_streams(*streams: torch.Tensor) -> torch.Tensor:
    """Several kept tensors (batch first) as one `(batch, sum of per-row sizes)` tensor."""
    return torch.cat([s.reshape(s.shape[0], -1) for s in streams], dim=1)


def unpack_stream(cache: torch.Tensor, index: int, *like: torch.Tensor) -> torch.Tensor:
    """Stream `index` of a packed cache, shaped like `like[index]` (the streams' bases)."""
    sizes = [t[0].numel() for t in like]
    start = sum(sizes[:index])
    return cache.narrow(1, start, sizes[index]).reshape(like[index].shape)


def cache_value(root: fx.GraphModule, cut: Cut):
    """The traced value (`meta["val"]`) of the cache a full step keeps at `cut`: the one stream's, or the streams
    packed (`pack_streams`); symbolic where `root` was traced over ranges."""
    values = [_node(root, s.node).meta["val"] for s in cut.streams]
    return values[0] if len(values) == 1 else pack_streams(*values)


def _node(root: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in root.graph.nodes if n.name == name)


def _output_names(root: fx.GraphModule) -> tuple[str, ...]:
    return tuple(n.name for n in root.graph.output_node().args[0])


def prune_dead_nodes(graph: fx.Graph) -> int:
    """Removes every node the output does not depend on, impure ones included; returns how many.

    Placeholders stay, so all graphs keep the same inputs.

    fx's own `eliminate_dead_code` keeps dropout, attention and assertion nodes because it deems them impure;
    a shallow graph that keeps them still computes the deep layers.
    """
    before = len(graph.nodes)
    graph.eliminate_dead_code(is_impure_node=lambda node: node.op in ("placeholder", "output"))
    return before - len(graph.nodes)


def check_split(split: SplitGraphs) -> None:
    """Checks the pair's invariants stated in this module's docstring; raises RuntimeError if one fails."""
    full_out = split.full.graph.output_node().args[0]
    cache_in = next(n for n in split.shallow.graph.nodes if n.op == "placeholder" and n.target == "cache")
    full_cache, shallow_cache = full_out[-1].meta.get("val"), cache_in.meta.get("val")
    if full_cache is None or shallow_cache is None:
        raise RuntimeError("partition lost the cached tensor's metadata")
    if full_cache.shape != shallow_cache.shape or full_cache.dtype != shallow_cache.dtype:
        raise RuntimeError(
            f"shallow cache input {tuple(shallow_cache.shape)}/{shallow_cache.dtype} does not match the full "
            f"graph's cache output {tuple(full_cache.shape)}/{full_cache.dtype}"
        )
    _check_consumer(split.shallow, split.branch, "shallow graph")


def check_three(three: ThreeGraphs, computing_nodes: int) -> None:
    """Checks the `ThreeGraphs` invariants; raises RuntimeError if one fails."""
    def computing(gm):  # input size reads are each graph's own (_input_size): counted once
        return {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                and not n.meta.get("deepcache_added") and not _input_size(n)}

    graphs = [computing(g) for g in (three.head, three.deep, three.tail)]
    sizes = {n.name for g in (three.head, three.deep, three.tail) for n in g.graph.nodes if _input_size(n)}
    counted = sum(len(g) for g in graphs) + len(sizes)
    if counted != computing_nodes:
        raise RuntimeError(f"head, deep and tail hold {counted} computing nodes, the model {computing_nodes}: "
                           f"a node was dropped or duplicated by the cut")
    _check_consumer(three.tail, three.branch, "tail")


def _check_consumer(gm: fx.GraphModule, cut: Cut, what: str) -> None:
    if not any(n.name == cut.consumer for n in gm.graph.nodes):
        raise RuntimeError(f"the {what} lost the cut's consumer {cut.consumer}: the cut is not above the cache")


def add_forecast(gm: fx.GraphModule) -> fx.GraphModule:
    """`(*inputs, cache) -> out` becomes `(*inputs, cache, slope, steps) -> out`, which reads
    `cache + slope * steps` wherever it read `cache`: a first-order extrapolation of the cached value (as
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
