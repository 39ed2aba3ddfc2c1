"""`load_deepcache`: an engine from exported files, on the Python runtime (`engine.DeepCacheEngine`) or the C++
one (`native.NativeEngine`). Neither engine module imports the other; this one chooses between them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..options import check_options
from .engine import DeepCacheEngine
from .formats import get_format
from .manifest import check_native_ops, read_manifest
from .native import NativeEngine

__all__ = ["load_deepcache"]


def load_deepcache(directory: str | Path, device: str | torch.device = "cpu", provider: str | None = None,
                   runtime: str = "python") -> "DeepCacheEngine":
    """Loads an export written by `dc.export(directory, format=...)`.

    Args:
        directory: the export directory (with `deepcache.json`).
        device: where to run ("cpu", "cuda", "cuda:1").
        provider: for ONNX, the onnxruntime execution provider (e.g. "CUDAExecutionProvider").
        runtime: "python" (this module) or "native": the C++ runtime of `kernels/` (aoti exports; built by
            `make native`) runs the dispatch, the cache and the checks.

    Example:
        >>> pipe.unet = load_deepcache("engines/sd15-b1", device="cuda")
        >>> image = pipe(prompt).images[0]
    """
    directory, device = Path(directory), torch.device(device)
    if runtime not in ("python", "native"):
        raise ValueError(f"runtime={runtime!r} is unknown: use 'python' or 'native'")
    if runtime == "native":
        if provider:
            raise ValueError("provider= applies to onnx exports; the native runtime runs aoti exports")
        return NativeEngine(directory, device)
    manifest = read_manifest(directory)
    check_native_ops(manifest, directory)
    reader = get_format(manifest["format"])
    options = {"provider": provider} if provider else {}
    check_options(f"loading a {manifest['format']} export", options, reader.LOAD_OPTIONS)
    full, shallow = (reader.load(directory / manifest["files"][part][0], device, **options)
                     for part in ("full", "shallow"))
    return DeepCacheEngine(manifest, full, shallow, device)
