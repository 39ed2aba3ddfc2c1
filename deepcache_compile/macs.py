"""Multiply-accumulates of a graph, counted with FlopCounterMode on fake tensors (no compute, no memory)."""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs"]


def count_macs(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> int:
    """MACs of one call of `gm` on inputs shaped like `inputs` (FLOPs / 2, as the paper counts).

    Example:
        >>> count_macs(split.shallow, (*inputs, cache)) < count_macs(split.full, inputs)
        True
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = tuple(mode.from_tensor(t) for t in inputs)
        with FlopCounterMode(display=False) as counter:
            gm(*fake)
    return counter.get_total_flops() // 2
