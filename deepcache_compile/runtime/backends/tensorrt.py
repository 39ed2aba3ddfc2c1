"""The `tensorrt` backend (GPU only): torch-tensorrt's dynamo path on each graph.

Options: `enabled_precisions` (default {torch.float32}; add torch.float16 for fp16 kernels) and any other
`torch_tensorrt.dynamo.compile` keyword. `.plan` engine files are `artifacts/formats/tensorrt.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ...graph.trace import export_program


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError("the tensorrt backend needs torch-tensorrt: pip install 'deepcache_compile[tensorrt]'") from err
    if example_inputs[0].device.type != "cuda":
        raise ValueError("the tensorrt backend runs on CUDA: move the U-Net and its inputs to a CUDA device")
    program = export_program(gm, example_inputs)
    options = {"enabled_precisions": {torch.float32}, **options}
    compiled = torch_tensorrt.dynamo.compile(program, inputs=list(example_inputs), **options)
    return lambda *tensors: tuple(compiled(*tensors))
