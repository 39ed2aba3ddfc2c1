"""int8 compiled graphs: the `Int8` option of `compile_deepcache` and `record_calls`, which records what it
calibrates on.

Static int8 needs the range of every activation it quantizes, so it is calibrated on real model calls: those of
a few generations, recorded once from the floating-point model (`record_calls`). When a pair is compiled, its
graphs are observed (`graph.quantize.observe`), the recorded calls of its input signature are replayed through
them on the pair's own schedule (full steps through the full graph, the steps between through the shallow graph
on the cache the full one kept: so the shallow graph's cache input is calibrated as it will be used), and each
graph is quantized before the backend compiles it.

Example:
    >>> calls = record_calls(pipe.unet, lambda: pipe(prompts, num_inference_steps=10))
    >>> pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=5, backend="inductor", quantize=Int8(calls))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Int8", "record_calls"]

# Backends that lower the quantize/dequantize pairs to int8 kernels (eager runs them as the float reference).
INT8_BACKENDS = ("eager", "inductor", "aoti")


@dataclass(frozen=True)
class Int8:
    """int8 weights (per output channel) and activations (per tensor, static ranges) for the compiled graphs.

    Attributes:
        calls: recorded model calls, `(args, kwargs)` in call order (`record_calls`); the calls of each compiled
            signature calibrate its pair. Several generations calibrate better than one (a few are enough).
        keep: module names left in floating point (the quantizer skips their layers), e.g. ("conv_out",
            "time_embedding").
        keep_input: leave the layer that reads the sample (a U-Net's `conv_in`, a transformer's patch
            embedding; found from the graph) in floating point: on the digits model the one layer whose
            quantization cost measurably (`graph.quantize`: 31.8 -> 38.2 dB PSNR of the int8 full model).
        reduce_range: 7-bit activations (0..127) instead of 8-bit. None (the default): as this CPU needs. Without
            VNNI (`vpdpbusd`), oneDNN multiplies uint8 by int8 with `vpmaddubsw`, which adds pairs of products
            into int16 and saturates: with 8-bit activations the compiled int8 graphs then drift from their own
            eager reference (measured on the digits model, AVX2 without VNNI: 23.7 dB PSNR against the eager int8
            generation; with 7-bit activations the products cannot overflow). With AVX512-VNNI the full 8 bits
            are kept (torch reports AVX512-VNNI only: a CPU with AVX-VNNI alone gets 7 bits, the safe side).
    """

    calls: tuple[tuple[tuple, dict], ...]
    keep: tuple[str, ...] = ()
    keep_input: bool = True
    reduce_range: bool | None = None

    def __post_init__(self):
        if not self.calls:
            raise ValueError("Int8(calls) needs recorded model calls to calibrate on: "
                             "calls = record_calls(pipe.unet, lambda: pipe(prompt, num_inference_steps=10))")
        if isinstance(self.keep, str):
            raise TypeError(f"Int8(keep={self.keep!r}): pass a tuple of module names, e.g. ('conv_in', 'conv_out')")

    def __repr__(self) -> str:
        return (f"Int8(<{len(self.calls)} calls>, keep={self.keep}, keep_input={self.keep_input}, "
                f"reduce_range={self.reduce_range})")

    @property
    def seven_bit(self) -> bool:
        """Whether the activations are quantized to 7 bits: `reduce_range`, or where None whether this CPU lacks
        VNNI."""
        return (not torch.cpu._is_vnni_supported()) if self.reduce_range is None else self.reduce_range


def record_calls(model: nn.Module, run: Callable[[], Any]) -> tuple[tuple[tuple, dict], ...]:
    """Runs `run()` (generations through `model`, e.g. `lambda: pipe(prompt, num_inference_steps=10)`) and returns
    every call `model` received, as detached copies of its `(args, kwargs)`, in order.

    Example:
        >>> calls = record_calls(unet, lambda: ddim_loop(unet, call, 10, scheduler))
    """
    calls: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        calls.append(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not calls:
        raise ValueError(f"record_calls: run() never called the {type(model).__name__}: pass a function that runs "
                         "generations through it (e.g. lambda: pipe(prompt, num_inference_steps=10))")
    return tuple(calls)
