"""int8 graphs: PyTorch's PT2E quantization (torchao's `prepare_pt2e` / `convert_pt2e` with the X86 Inductor
quantizer) on one graph of a split.

`observe` inserts observers (weights per output channel, activations per tensor, symmetric int8 weights and
uint8 activations, as the X86 quantizer lays them out for oneDNN's VNNI kernels); running the observed graph on
real inputs records the activation ranges; `quantize` turns it into a graph of quantize/dequantize pairs around
the convolutions, linears and matmuls. Eager, that graph computes the int8 result in floating point (the
reference); Inductor and AOTInductor with freezing fold the pairs into oneDNN int8 kernels.

Layers named in `keep` stay in floating point: the quantizer skips nodes whose `nn_module_stack` passes through
a module with that name (the traced U-Net's own module names: "time_embedding", "conv_in", "conv_out"). With
`keep_input` the layer that reads the sample (`input_layer`: found from the graph, so for any model) stays too:
the noisy sample spans a wide range that one per-tensor uint8 scale resolves poorly (measured on the digits
model: the int8 full model at 31.8 dB PSNR against fp32 with it quantized, 38.2 dB with it kept; keeping any
one other block or the last convolution instead moved the figure by no more than the run's noise, 29.6-32.7).

Example:
    >>> observed = observe(split.full, keep=("conv_in", "conv_out"))
    >>> observed(*inputs)  # once per calibration call
    >>> int8_full = quantize(observed)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import fx

__all__ = ["INSTALL", "check_keep", "input_layer", "observe", "quantize", "quantized_ops"]

logger = logging.getLogger(__name__)

INSTALL = "int8 needs torchao (PT2E quantization): pip install 'deepcache-compile[int8]' (or pip install torchao)"


def _torchao():
    # torchao 0.18 reports its CUDA-only extensions missing on CPU builds, and torch logs a deprecation for each
    # enum it registers: noise for a CPU user, silenced while it imports.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as err:
        raise ImportError(INSTALL) from err
    finally:
        pytree_log.setLevel(level)
    return quantize_pt2e, x86


def observe(gm: fx.GraphModule, keep: tuple[str, ...] = (), keep_input: bool = False,
            reduce_range: bool = False) -> fx.GraphModule:
    """`gm` with observers on the inputs and weights of its convolutions, linears and matmuls (not those under a
    module named in `keep`, nor, with `keep_input`, the layer that reads the first input: `input_layer`);
    activations on 7 bits with `reduce_range` (for CPUs without VNNI: `precision.Int8`). `gm` is not modified;
    the observed graph shares its weights."""
    quantize_pt2e, x86 = _torchao()
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    quantizer = x86.X86InductorQuantizer().set_global(config)
    paths = [_module_path(gm, name) for name in keep] + ([input_layer(gm)] if keep_input else [])
    for path in paths:
        if path is not None:  # a graph of a split may hold none of a kept module's layers
            quantizer.set_module_name_qconfig(path, None)
    # prepare_pt2e annotates node metadata in place: work on a copy of the graph (same weights).
    return quantize_pt2e.prepare_pt2e(fx.GraphModule(gm, _copied_graph(gm.graph)), quantizer)


def quantize(observed: fx.GraphModule) -> fx.GraphModule:
    """The observed graph, after its calibration calls, as an int8 graph (quantize/dequantize pairs)."""
    quantize_pt2e, _ = _torchao()
    if not any(_calibrated(m) for m in observed.modules() if hasattr(m, "min_val")):
        raise RuntimeError("the observed graph has not seen any input: run its calibration calls before quantize()")
    return quantize_pt2e.convert_pt2e(observed)


def quantized_ops(gm: fx.GraphModule) -> int:
    """How many weights the graph quantizes (per-channel quantize/dequantize pairs on parameters)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "per_channel" in str(n.target)
               and "dequantize" in str(n.target))


def _calibrated(observer) -> bool:
    return bool(torch.isfinite(observer.min_val).all()) and observer.min_val.numel() > 0


def _copied_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    for old, copied in env.items():
        copied.meta = dict(old.meta)
    return new


_WEIGHT_LAYERS = ("conv", "linear")


def input_layer(gm: fx.GraphModule) -> str | None:
    """The module of the first convolution or linear the graph's first input (the sample) reaches: `conv_in` of a
    U-Net, the patch embedding of a transformer; None where it reaches none."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    frontier, seen = [first], {first}
    while frontier:  # breadth first, in graph order within each wave
        wave = sorted({u for n in frontier for u in n.users if u not in seen}, key=_order(gm))
        for node in wave:
            if node.op == "call_function" and any(w in str(node.target) for w in _WEIGHT_LAYERS):
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                return stack[-1][0] if stack else None
        seen.update(wave)
        frontier = wave
    return None


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


def check_keep(gm: fx.GraphModule, keep: tuple[str, ...]) -> None:
    """Raises ValueError for a name in `keep` that no module of the traced model `gm` has."""
    for name in keep:
        if _module_path(gm, name) is None:
            raise ValueError(f"int8 keep={name!r}: no layer of the traced graph is called {name!r} (keep takes the "
                             "model's module names, e.g. 'conv_in', 'time_embedding', 'up_blocks.2', 'conv_out')")


def _module_path(gm: fx.GraphModule, name: str) -> str | None:
    """`name` as it appears in the traced graph's `nn_module_stack` ("unet.conv_in" for the U-Net's "conv_in":
    the trace wraps the model); None where no node of `gm` comes from it."""
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path == name or path.endswith("." + name):
                return path
    return None
