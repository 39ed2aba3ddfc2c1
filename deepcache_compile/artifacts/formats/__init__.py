"""Engine file formats, one module each behind a small registry.

A format module defines:
- `SUFFIX`: the file name ending of each part (`full<SUFFIX>`, `shallow<SUFFIX>`);
- `TIED_TO`: the library whose exact version must load its files (None if any version may);
- `WRITE_OPTIONS`, `LOAD_OPTIONS`: the option names `write` and `load` accept;
- `GRAPH_OPTIONS`: export options that choose graph passes before the program is written (`export` applies them);
- `write(program, path, io, ranges, **options) -> list[Path]`: writes one exported program (and any side files);
- `load(path, device, **options) -> runner`: a callable `(*tensors) -> tuple[tensor, ...]` whose `compiled_ranges`
  is the `ranges_text` written into the file itself (pt2 extra files, AOTInductor package metadata, ONNX model
  metadata), or None where the format enforces its own (TensorRT's optimization profile). The loaders compare it
  with the manifest's ranges, so an edited manifest cannot widen what a file accepts.

Format modules import torch and their own runtime only, never the graph passes or the dispatcher, so both
`export` and the in-process backends that compile through a file (aoti, onnxruntime) can use them.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from types import ModuleType

__all__ = ["PartIO", "RANGES_KEY", "available_formats", "get_format", "ranges_text"]

RANGES_KEY = "deepcache.ranges"  # the name under which each file holds the ranges it was compiled for

_REGISTRY = {
    "pt2": "deepcache_compile.artifacts.formats.pt2",
    "aoti": "deepcache_compile.artifacts.formats.aoti",
    "onnx": "deepcache_compile.artifacts.formats.onnx",
    "tensorrt": "deepcache_compile.artifacts.formats.tensorrt",
}


@dataclass(frozen=True)
class PartIO:
    """Input and output names of one exported graph (the full or the shallow one)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def ranges_text(ranges) -> str:
    """The shape ranges a file is compiled for, as canonical JSON (sorted keys, no spaces): the same bytes the C++
    runtime's nlohmann::json::dump() makes of them, so both runtimes compare them as text."""
    given = ranges if isinstance(ranges, dict) else asdict(ranges)  # a manifest's, or a ShapeRanges
    fields = {key: list(given[key]) for key in ("batch", "height", "width")} | {"multiple": given["multiple"]}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def available_formats() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_format(name: str) -> ModuleType:
    """The module of format `name`; ValueError naming the known formats otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"format={name!r} is unknown: choose one of {available_formats()}")
    return importlib.import_module(_REGISTRY[name])
