"""`load_deepcache`: an engine from exported files, on the Python runtime (`engine.DeepCacheEngine`) or the C++
one (`native.NativeEngine`). Neither engine module imports the other; this one chooses between them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..options import check_options
from .engine import DeepCacheEngine
from .formats import get_format
from .manifest import check_compiled_ranges, check_native_ops, read_manifest
from .native import NativeEngine
from .signing import verified_manifest_bytes

__all__ = ["load_deepcache"]


def load_deepcache(directory: str | Path, device: str | torch.device = "cpu", provider: str | None = None,
                   runtime: str = "python", trusted_keys=None) -> "DeepCacheEngine":
    """Loads an export written by `dc.export(directory, format=...)`.

    Args:
        directory: the export directory (with `deepcache.json`).
        device: where to run ("cpu", "cuda", "cuda:1").
        provider: for ONNX, the onnxruntime execution provider (e.g. "CUDAExecutionProvider").
        runtime: "python" (this module) or "native": the C++ runtime of `kernels/` (aoti exports; built by
            `make native`) runs the dispatch, the cache and the checks.
        trusted_keys: Ed25519 public key files (PEM); when given, the export must be signed by one of them
            (`export(..., sign_key=)`), verified before anything else is read (`signing`).

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
        return NativeEngine(directory, device, trusted_keys)
    data = verified_manifest_bytes(directory, trusted_keys) if trusted_keys is not None else None
    manifest = read_manifest(directory, data)
    check_native_ops(manifest, directory)
    reader = get_format(manifest["format"])
    options = {"provider": provider} if provider else {}
    check_options(f"loading a {manifest['format']} export", options, reader.LOAD_OPTIONS)
    parts = {}
    for part in _parts(manifest):
        file = directory / manifest["files"][part][0]
        parts[part] = reader.load(file, device, **options)
        check_compiled_ranges(manifest, file, parts[part].compiled_ranges)
    return DeepCacheEngine(manifest, parts, device)


def _parts(manifest: dict) -> tuple[str, ...]:
    """The engine files an export holds: the step program (a policy decided on the device), head/deep/tail
    (adaptive refresh decided on the host) or the full/shallow pair."""
    policy = manifest.get("policy")
    if policy is None:
        return ("full", "shallow")
    return ("step",) if policy.get("decided") == "device" else ("head", "deep", "tail")
