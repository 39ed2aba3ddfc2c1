"""`tensorrt`: serialized TensorRT engines (`.plan`, GPU only), built from the ONNX files with one optimization
profile whose min/opt/max shapes come from the export's ranges. Tied to the TensorRT version that built them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ...shapes import TracedSizes, size_exprs
from .onnx import write_onnx

SUFFIX = ".plan"
TIED_TO = "tensorrt"
WRITE_OPTIONS = ("fp16",)
GRAPH_OPTIONS: tuple[str, ...] = ()
LOAD_OPTIONS: tuple[str, ...] = ()


def _trt():
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError("TensorRT engines need tensorrt: pip install 'deepcache_compile[tensorrt]'") from err
    return tensorrt


def write(program: torch.export.ExportedProgram, path: Path, io, ranges, fp16: bool = False) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="deepcache_trt_") as tmp:
        onnx_path = Path(tmp) / f"{path.stem}.onnx"
        write_onnx(program, onnx_path, io.inputs, io.outputs)
        plan = build_engine(onnx_path, profile(program, io.inputs, ranges), fp16=fp16)
    path.write_bytes(plan)
    return [path]


def load(path: Path, device: torch.device) -> "TrtRunner":
    return TrtRunner(path.read_bytes(), device)


def profile(program: torch.export.ExportedProgram, input_names, ranges) -> dict:
    """(min, opt, max) shapes per dynamic input: opt is the traced example; batch and spatial sizes scale with
    the sample (the first input), so caches and residuals at 1/2, 1/4, ... of its size follow it."""
    example = [p.meta["val"] for p in program.graph.nodes if p.op == "placeholder"][-len(input_names):]
    hint = [tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in v.shape) for v in example]
    sample = hint[0]
    traced = TracedSizes(tuple(size_exprs(v.shape) for v in example))
    # Every size from the program's symbols: solved from the sample's, or, for one export chose itself (a
    # transformer residual's h * w tokens, given as Dim.AUTO), the end of the range it derived for it.
    derived = {sym: (int(r.lower), int(r.upper)) for sym, r in program.range_constraints.items()
               if r.is_int and r.lower.is_finite and r.upper.is_finite}
    try:
        ends = traced.at((ranges.batch[0], *sample[1:-2], ranges.height[0], ranges.width[0]),
                         {sym: lo for sym, (lo, _) in derived.items()}), traced.at(
            (ranges.batch[1], *sample[1:-2], ranges.height[1], ranges.width[1]),
            {sym: hi for sym, (_, hi) in derived.items()})
    except ValueError:  # a size with no finite range: the rule of shapes.py
        ends = None
    shapes = {}
    for i, (name, val, opt) in enumerate(zip(input_names, example, hint)):
        if not any(isinstance(s, torch.SymInt) for s in val.shape):
            continue
        if ends is not None:
            shapes[name] = (ends[0][i], opt, ends[1][i])
            continue
        lo, hi = list(opt), list(opt)
        if opt[0] == sample[0]:
            lo[0], hi[0] = ranges.batch
        if len(opt) >= 4:
            for dim, (a, b) in ((-2, ranges.height), (-1, ranges.width)):
                scale = opt[dim] / sample[dim]
                lo[dim], hi[dim] = max(1, int(a * scale)), int(b * scale)
        shapes[name] = (tuple(lo), opt, tuple(hi))
    return shapes


def build_engine(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], fp16: bool = False) -> bytes:
    """Builds a serialized TensorRT engine from an ONNX file with one optimization profile.

    `shapes` maps each dynamic input name to its (min, opt, max) shapes.
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
    for name, (lo, opt, hi) in shapes.items():
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
        self.compiled_ranges = None  # TensorRT refuses shapes outside the engine's optimization profile itself
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
