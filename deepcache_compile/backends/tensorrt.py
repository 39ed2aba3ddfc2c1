"""The `tensorrt` backend (GPU only): torch-tensorrt's dynamo path on each graph; and the TensorRT engine
builder and runner that `dc.export(dir, format="tensorrt")` / `load_deepcache` use for `.plan` files.

Options for the backend: `enabled_precisions` (default {torch.float32}; add torch.float16 for fp16 kernels)
and any other `torch_tensorrt.dynamo.compile` keyword.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import fx

logger = logging.getLogger(__name__)


def _trt():
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError("TensorRT engines need tensorrt: pip install 'deepcache_compile[tensorrt]'") from err
    return tensorrt


def build_engine(onnx_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]], fp16: bool = False) -> bytes:
    """Builds a serialized TensorRT engine from an ONNX file with one optimization profile.

    `profile` maps each dynamic input name to its (min, opt, max) shapes.
    """
    trt = _trt()
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    return bytes(plan)


class TrtRunner:
    """Runs a serialized TensorRT engine on CUDA tensors: `(*tensors) -> tuple[tensor, ...]`, no host copies."""

    def __init__(self, plan: bytes, device: torch.device | str = "cuda"):
        trt = _trt()
        self.device = torch.device(device)
        self._trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine: built for another TensorRT version or GPU?")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32}[self.engine.get_tensor_dtype(name)]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keep = [t.contiguous() for t in tensors]
        for name, t in zip(self.inputs, keep):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtype(name), device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return tuple(outs)


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError("the tensorrt backend needs torch-tensorrt: pip install 'deepcache_compile[tensorrt]'") from err
    if example_inputs[0].device.type != "cuda":
        raise ValueError("the tensorrt backend runs on CUDA: move the U-Net and its inputs to a CUDA device")
    program = torch.export.export(gm, example_inputs, strict=False)
    options = {"enabled_precisions": {torch.float32}, **options}
    compiled = torch_tensorrt.dynamo.compile(program, inputs=list(example_inputs), **options)
    return lambda *tensors: tuple(compiled(*tensors))
