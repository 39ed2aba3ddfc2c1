"""Multiply-accumulates per graph node, counted with FlopCounterMode on fake tensors (no compute, no memory).

The root graph is interpreted once, node by node; the MACs of any graph cut from it (full or shallow, at any
branch) are then the sum over the nodes it kept, which `graph_copy` keeps under the same names.
Attention products are counted: on CPU, SDPA dispatches to `_scaled_dot_product_flash_attention_for_cpu`,
which FlopCounterMode has no formula for, so one is registered here (the same formula as the GPU kernels).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["node_macs", "graph_macs"]


def _register_cpu_sdpa_formula() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_counter.flop_registry or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa_formula()


class _CountingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter, self.macs = counter, {}

    def run_node(self, node: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(node)
        self.macs[node.name] = (self.counter.get_total_flops() - before) // 2
        return result


def node_macs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """MACs of each node of `gm` for one call on inputs shaped like `inputs` (FLOPs / 2).

    Example:
        >>> macs = node_macs(traced.gm, traced.example_inputs)
        >>> round(sum(macs.values()) / 1e9, 1)   # SD 1.5, 512 px, batch 1
        401.6
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = tuple(mode.from_tensor(t) for t in inputs)
        with FlopCounterMode(display=False) as counter:
            interpreter = _CountingInterpreter(gm, counter)
            interpreter.run(*fake)
    return interpreter.macs


def graph_macs(gm: fx.GraphModule, macs: dict[str, int]) -> int:
    """MACs of a graph cut from the root that `macs` was counted on."""
    return sum(macs.get(node.name, 0) for node in gm.graph.nodes)
