"""`onnx`: ONNX files with external weights and dynamic batch/height/width, run by onnxruntime.

`OrtRunner` runs a file with torch tensors in and out through IO binding on every device: onnxruntime reads the
inputs and writes the outputs in place (device pointers on CUDA, no host copies), and any dtype onnxruntime
knows works, bf16 included (numpy has none). Outputs come back through DLPack, without a copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ...tracing import GATE
from . import RANGES_KEY, ranges_text

SUFFIX = ".onnx"
TIED_TO = None
WRITE_OPTIONS: tuple[str, ...] = ()
GRAPH_OPTIONS: tuple[str, ...] = ()
LOAD_OPTIONS = ("provider", "session_options")

# onnx.TensorProto element types, by torch dtype (what IO binding takes where numpy has no dtype, e.g. bf16).
_TORCH_TO_ONNX = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
                  torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX files run with onnxruntime: pip install 'deepcache_compile[onnx]' (or '[onnx-gpu]' for CUDA)"
        ) from err
    return onnxruntime


def write_onnx(program: torch.export.ExportedProgram, path: Path, input_names: Sequence[str],
               output_names: Sequence[str]) -> list[Path]:
    """Writes `program` as ONNX at `path` (weights as external data beside it); returns the files written."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'deepcache_compile[onnx]'") from err
    with GATE.trace():  # its decompositions flip process-wide backend flags (see tracing.py)
        torch.onnx.export(program, (), str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamo=True, external_data=True, verbose=False)
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def write(program: torch.export.ExportedProgram, path: Path, io, ranges) -> list[Path]:
    files = write_onnx(program, path, io.inputs, io.outputs)
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph only: the weights stay where they are
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        RANGES_KEY: ranges_text(ranges)})
    onnx.save(model, str(path))
    return files


def load(path: Path, device: torch.device, provider: str | None = None,
         session_options: dict[str, Any] | None = None) -> "OrtRunner":
    return OrtRunner(path, device, [provider] if provider else None, session_options)


def default_providers(device: torch.device) -> list[str]:
    available = _ort().get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Runs an ONNX file with torch tensors in and out: `(*tensors) -> tuple[tensor, ...]`.

    The session holds the weights once it is created: the files may be removed afterwards. `names` names the
    positional arguments as they were exported: the exporter drops inputs the graph does not use (a tail graph
    does not read the sample), so arguments are bound by name; without `names` the file's inputs are taken to
    be all the arguments, in order.
    """

    owns_weights = True  # the session holds its own copy of every initializer (measured: at every optimization level)

    def __init__(self, path: Path, device: torch.device, providers: Sequence[str] | None = None,
                 session_options: dict[str, Any] | None = None, names: Sequence[str] | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        for key, value in (session_options or {}).items():
            if "." in key:  # a session config entry, e.g. "session.intra_op.allow_spinning"
                options.add_session_config_entry(key, str(value))
            else:
                setattr(options, key, value)
        self.device = torch.device(device)
        self.providers = list(providers or default_providers(self.device))
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._positions = [list(names).index(n) for n in self.input_names] if names else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.compiled_ranges = self.session.get_modelmeta().custom_metadata_map.get(RANGES_KEY, "")
        # Where onnxruntime reads and writes: the device's memory if the first provider runs there, else host.
        on_device = self.device.type == "cuda" and self.session.get_providers()[0] != "CPUExecutionProvider"
        self._where = ("cuda", self.device.index or 0) if on_device else ("cpu", 0)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        if self._positions is not None:
            tensors = [tensors[i] for i in self._positions]
        kept = [t.to(self._where[0]).contiguous() for t in tensors]  # alive until the run returns
        for name, t in zip(self.input_names, kept):
            binding.bind_input(name, *self._where, _TORCH_TO_ONNX[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, *self._where)
        if self._where[0] == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_dlpack(o).to(self.device) for o in binding.get_outputs())
