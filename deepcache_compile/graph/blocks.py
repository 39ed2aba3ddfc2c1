"""Exported transformer graph -> block-range cuts (residual `Cut`s), as first-block caches use them.

A diffusion transformer is a stack of repeated blocks (`transformer_blocks.k`, `single_transformer_blocks.k`,
`blocks.k`: children of a `ModuleList` of the root). They are found from `nn_module_stack` alone: every node
of block k carries the block's path, and each block's nodes are contiguous in graph order (checked). Cut
`b` computes blocks 0..b and the last `last_blocks` blocks on every step and caches the range between: a full
step keeps the range's residual (its output minus its input, per stream leaving the range), a cached step adds
it to the range's fresh input. A stream's input is the range input of the same shape and dtype that only the
range's first block reads (the other inputs, read by every block, are conditionings: time embedding, text,
rotary tables). The probe of refresh policies is the residual of the computed leading blocks (the range's
input minus block 0's input of that stream), the signal of first-block caches.
"""

from __future__ import annotations

import logging
import re

from torch import fx

from .cuts import Cut, Stream, example_shape, register_finder, same_sizes

logger = logging.getLogger(__name__)

__all__ = ["find_blocks", "find_block_cuts"]

_BLOCK = re.compile(r"^[A-Za-z_]\w*\.\d+$")  # a child of a root-level ModuleList: "transformer_blocks.3"


def find_blocks(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node]]]:
    """The repeated blocks of a traced model in graph order: `(path, nodes)`; [] if it has fewer than two.

    Raises ValueError where a block's nodes are interleaved with another's (a cut could not separate them).
    """
    blocks: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _block_path(node)
        if path is not None:
            blocks.setdefault(path, []).append(node)
    if len(blocks) < 2:
        return []
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    ordered = sorted(blocks.items(), key=lambda item: position[item[1][0]])
    for (path, nodes), (next_path, next_nodes) in zip(ordered, ordered[1:]):
        if position[nodes[-1]] > position[next_nodes[0]]:
            raise ValueError(f"the nodes of {path} and {next_path} are interleaved in the traced graph: a block "
                             "range cannot be cut out of it")
    return ordered


def _block_path(node: fx.Node) -> str | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path.removeprefix("unet.")
        if _BLOCK.match(path):
            return path
    return None


def find_block_cuts(gm: fx.GraphModule, last_blocks: int = 0, **options) -> tuple[Cut, ...]:
    """Transformer blocks: children of a root-level ModuleList, repeated, each contiguous in the graph."""
    blocks = find_blocks(gm)
    if not blocks:
        return ()
    if not isinstance(last_blocks, int) or not 0 <= last_blocks <= len(blocks) - 2:
        raise ValueError(f"last_blocks={last_blocks!r} is out of range for this model: it has {len(blocks)} blocks, "
                         f"and at least the first block and one cached block must remain (use 0..{len(blocks) - 2})")
    stop = len(blocks) - last_blocks
    needed = _needed(gm)
    cuts = []
    for first in range(1, stop):
        cut = _range_cut(gm, blocks, first, stop, needed)
        if cut is not None:
            cuts.append(cut)
    return tuple(cuts)


register_finder("transformer-blocks", find_block_cuts)


def _needed(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the output depends on (assertions and other dead nodes are not)."""
    needed, stack = set(), [gm.graph.output_node()]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    return needed


def _range_cut(gm: fx.GraphModule, blocks: list, first: int, stop: int, needed: set) -> Cut | None:
    """The cut that caches blocks [first, stop), or None where an output of the range has no stream input."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    lo, hi = position[blocks[first][1][0]], position[blocks[stop - 1][1][-1]]
    span = set(nodes[lo:hi + 1])
    outputs = [n for n in nodes[lo:hi + 1] if n in needed and any(u not in span and u in needed for u in n.users)]
    streams_in = _stream_inputs(nodes, blocks, first, stop, position, needed)
    streams = []
    for out in outputs:
        base = _stream_input(out, streams_in)
        if base is None:
            logger.debug("blocks [%d, %d): output %s has no stream input of its shape", first, stop, out.name)
            return None
        val = out.meta["val"]
        streams.append(Stream(out.name, base.name, example_shape(val), val.dtype))
    consumer = next(u for u in nodes[hi + 1:] if u in needed and any(a.name == streams[0].node for a in u.all_input_nodes))
    last = blocks[stop - 1][0]
    probe = next(n for n in nodes if n.name == streams[0].base)
    probe_base = _stream_input(probe, _stream_inputs(nodes, blocks, 0, first, position, needed))
    return Cut(index=first - 1, streams=tuple(streams), probe=probe.name, consumer=consumer.name,
               probe_base=None if probe_base is None else probe_base.name, producer_module=blocks[first - 1][0],
               consumer_module=f"{blocks[first][0]}..{last} cached" if stop - first > 1 else f"{last} cached")


def _stream_inputs(nodes: list, blocks: list, first: int, stop: int, position: dict, needed: set) -> list[fx.Node]:
    """The inputs of blocks [first, stop) that only the range's first block reads (candidate streams)."""
    lo, hi = position[blocks[first][1][0]], position[blocks[stop - 1][1][-1]]
    span = set(nodes[lo:hi + 1])
    inputs = [n for n in nodes[:lo] if n.op != "get_attr" and any(u in span and u in needed for u in n.users)]
    first_block = set(blocks[first][1])
    return [n for n in inputs if all(u in first_block for u in n.users if u in span and u in needed)]


def _stream_input(out: fx.Node, candidates: list[fx.Node]) -> fx.Node | None:
    val = out.meta.get("val")
    same = [c for c in candidates if _same_type(c.meta.get("val"), val)]
    return same[0] if len(same) == 1 else None


def _same_type(a, b) -> bool:
    return a is not None and b is not None and hasattr(a, "shape") and hasattr(b, "shape") \
        and same_sizes(a.shape, b.shape) and a.dtype == b.dtype

