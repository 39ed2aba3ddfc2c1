"""The `tensorrt` backend (GPU only): torch-tensorrt's dynamo path on each graph.

With `ranges` (dynamic pairs) the engine gets one optimization profile from their ends.
Options: `enabled_precisions` (default: the sample's dtype, e.g. {torch.float16} for an fp16 U-Net) and any other
`torch_tensorrt.dynamo.compile` keyword. `.plan` engine files are `artifacts/formats/tensorrt.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ...graph.trace import export_program
from ...shapes import ShapeRanges, TracedSizes


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any],
                  ranges: ShapeRanges | None = None):
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError("the tensorrt backend needs torch-tensorrt: pip install 'deepcache_compile[tensorrt]'") from err
    if example_inputs[0].device.type != "cuda":
        raise ValueError("the tensorrt backend runs on CUDA: move the U-Net and its inputs to a CUDA device")
    program = export_program(gm, example_inputs, ranges)
    options = {"enabled_precisions": {example_inputs[0].dtype}, **options}
    inputs = list(example_inputs) if ranges is None else _dynamic_inputs(example_inputs, ranges,
                                                                          TracedSizes.of(gm, example_inputs))
    compiled = torch_tensorrt.dynamo.compile(program, inputs=inputs, **options)
    def run(*tensors):
        return tuple(compiled(*tensors))

    run.owns_weights = True  # the engine's weights
    return run


def _dynamic_inputs(example_inputs: tuple[torch.Tensor, ...], ranges: ShapeRanges,
                    traced: TracedSizes | None) -> list:
    """One `torch_tensorrt.Input` per input: min/opt/max shapes at the ranges' ends (from the graph's traced sizes
    where it has them: a transformer residual's token count), opt at the example."""
    import torch_tensorrt

    return [torch_tensorrt.Input(min_shape=lo, opt_shape=tuple(t.shape), max_shape=hi, dtype=t.dtype)
            for t, (lo, hi) in zip(example_inputs, ranges.bounds(example_inputs, traced))]
