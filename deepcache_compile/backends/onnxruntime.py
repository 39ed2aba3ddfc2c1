"""The `onnxruntime` backend: each graph exported to ONNX (torch.onnx, dynamo) and run by an InferenceSession.

Options: `providers` (default: CUDA when the inputs are on CUDA and onnxruntime-gpu has it, else CPU),
`session_options` (a dict of `onnxruntime.SessionOptions` attributes). On CUDA the inputs, the cache and the
outputs stay on the device: IO binding hands onnxruntime the tensors' device pointers, no host copies.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

logger = logging.getLogger(__name__)

_NP_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(double)": torch.float64}


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "the onnxruntime backend needs onnxruntime: pip install 'deepcache_compile[onnx]' "
            "(or '[onnx-gpu]' for CUDA)"
        ) from err
    return onnxruntime


def export_onnx(program: torch.export.ExportedProgram, path: Path, input_names: Sequence[str],
                output_names: Sequence[str]) -> list[Path]:
    """Writes `program` as ONNX at `path` (weights as external data beside it); returns the files written."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'deepcache_compile[onnx]'") from err
    torch.onnx.export(program, (), str(path), input_names=list(input_names), output_names=list(output_names),
                      dynamo=True, external_data=True, verbose=False)
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def default_providers(device: torch.device) -> list[str]:
    available = _ort().get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Runs an ONNX file with torch tensors in and out: `(*tensors) -> tuple[tensor, ...]`."""

    def __init__(self, path: Path, device: torch.device, providers: Sequence[str] | None = None,
                 session_options: dict[str, Any] | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        for key, value in (session_options or {}).items():
            setattr(options, key, value)
        self.device = torch.device(device)
        self.providers = list(providers or default_providers(self.device))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, _NP_TO_TORCH.get(o.type, torch.float32)) for o in self.session.get_outputs()]
        self._bind = self.device.type == "cuda" and self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._bind:
            return self._run_bound(tensors)
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors)}
        return tuple(torch.from_numpy(a).to(self.device) for a in self.session.run(None, feeds))

    def _run_bound(self, tensors) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        for name, t in zip(self.input_names, tensors):
            t = t.contiguous()
            binding.bind_input(name, "cuda", self.device.index or 0, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for name, _ in self.outputs:
            binding.bind_output(name, "cuda", self.device.index or 0)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else
                     torch.from_numpy(o.numpy()).to(self.device) for o in binding.get_outputs())


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.float64: np.float64}[dtype]


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    unknown = set(options) - {"providers", "session_options"}
    if unknown:
        raise ValueError(f"onnxruntime backend options {sorted(unknown)} are unknown: use providers, session_options")
    program = torch.export.export(gm, example_inputs, strict=False)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    outputs = [f"output_{i}" for i in range(len(gm.graph.output_node().args[0]))]
    directory = Path(tempfile.mkdtemp(prefix="deepcache_ort_"))
    export_onnx(program, directory / f"{type(gm).__name__}.onnx", names, outputs)
    runner = OrtRunner(directory / f"{type(gm).__name__}.onnx", example_inputs[0].device, **options)
    logger.info("onnxruntime session for %s on %s", type(gm).__name__, runner.session.get_providers())
    return runner
