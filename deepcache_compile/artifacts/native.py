"""The native runtime from Python: `load_deepcache(dir, runtime="native")`.

`kernels/` builds `libdeepcache_runtime.so` (CMake; `make native`), a C++ library that verifies an `aoti`
export, loads both packages with `AOTIModelPackageLoader` and runs the schedule, the cache and the generation
state itself. Loaded with `torch.ops.load_library`, it registers the TorchScript class
`torch.classes.deepcache.Engine`; `NativeEngine` gives it the U-Net call interface of `DeepCacheEngine`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..runtime.generation import GenerationStates
from .engine import DeepCacheEngine, EngineOutput
from .manifest import FORMAT_VERSION, MANIFEST, ManifestError
from .signing import SIGNATURE

__all__ = ["NativeEngine", "library_path", "load_library"]

_LIBRARY = "libdeepcache_runtime.so"


def library_path() -> Path:
    """Where the built library is: `$DEEPCACHE_RUNTIME_LIB`, else beside the package (`make native` puts it there)."""
    return Path(os.environ.get("DEEPCACHE_RUNTIME_LIB") or Path(__file__).parents[1] / "_native" / _LIBRARY)


def load_library() -> None:
    """Loads the native runtime into this process once; a clear error if it was not built."""
    if hasattr(torch.classes, "deepcache") and "Engine" in dir(torch.classes.deepcache):
        return
    path = library_path()
    if not path.is_file():
        raise FileNotFoundError(f"the native runtime {path} is not built: run `make native` (CMake, see the "
                                "README), or set DEEPCACHE_RUNTIME_LIB to the library's path")
    torch.ops.load_library(str(path))
    _check_format(json.loads(torch.ops.deepcache.format_info()), path)


def _check_format(declared: dict, path: Path) -> None:
    """The library and this package must read the same export format (version, manifest name, error kinds)."""
    ours = {"format_version": FORMAT_VERSION, "manifest": MANIFEST, "signature": SIGNATURE,
            "error_kinds": ["ManifestError"]}
    if declared != ours:
        raise RuntimeError(f"the native runtime {path} reads exports as {declared}, this deepcache_compile as {ours}: "
                           "rebuild it from this checkout (`make native`)")


class NativeEngine(DeepCacheEngine):
    """A `DeepCacheEngine` whose dispatch, cache and checks run in C++ (`kernels/engine.cpp`).

    Concurrent generations share it as they share a `DeepCacheEngine`: each thread has a C++ generation of its
    own, and each `with engine.generation():` block a fresh one; `runners` > 1 lets that many calls run at once
    (AOTInductor model instances over one copy of the weights; with 1 they take turns). The C++ side's errors
    arrive by kind: an export it refuses as `ManifestError` (read from `load_error()`, not from the message), bad
    input as ValueError (C++ `std::invalid_argument`).

    Example:
        >>> pipe.unet = load_deepcache("engines/digits-b0", runtime="native")
    """

    def __init__(self, directory: Path, device: torch.device, trusted_keys=None, runners: int = 1):
        load_library()
        index = -1 if device.type == "cpu" else (device.index or 0)
        if trusted_keys is not None and not list(trusted_keys):
            raise ValueError("trusted_keys is empty: pass the public key files exports must be signed with")
        keys = [str(key) for key in trusted_keys] if trusted_keys is not None else []
        native = torch.classes.deepcache.Engine(str(directory), index, keys, runners)
        kind, message = native.load_error()
        if kind == "ManifestError":
            raise ManifestError(message)
        super().__init__(json.loads(native.manifest()), None, device)  # verified by the C++ side
        self._native = native
        # One C++ generation per thread and per generation() block, chosen as the Python engine chooses its states
        # (reset() and generation() are DeepCacheEngine's).
        self._states = GenerationStates(self.manifest["calls_per_step"], new=native.generation)

    def forward(self, *args, return_dict: bool = True, **kwargs):
        given = dict(zip(self._params, args), **kwargs)
        sample = self._native.run_in(self._states.current(), list(self._flatten(given)))
        return EngineOutput(sample) if return_dict else (sample,)

    @property
    def step(self) -> int:
        return self._states.current().step()

    @property
    def history(self) -> str:
        return self._states.current().history()
