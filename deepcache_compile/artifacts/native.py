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

from .engine import DeepCacheEngine, EngineOutput
from .manifest import ManifestError

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


class NativeEngine(DeepCacheEngine):
    """A `DeepCacheEngine` whose dispatch, cache and checks run in C++ (`kernels/engine.cpp`).

    One generation at a time: the C++ engine holds one generation state (load one engine per concurrent
    generation).

    Example:
        >>> pipe.unet = load_deepcache("engines/digits-b0", runtime="native")
    """

    def __init__(self, directory: Path, device: torch.device):
        load_library()
        index = -1 if device.type == "cpu" else (device.index or 0)
        try:
            native = torch.classes.deepcache.Engine(str(directory), index)
        except RuntimeError as err:
            message = str(err).splitlines()[0]
            if message.startswith(str(directory)):  # the C++ manifest checks name the file first
                raise ManifestError(message) from None
            raise
        super().__init__(json.loads(native.manifest()), None, None, device)  # verified by the C++ side
        self._native = native

    def forward(self, *args, return_dict: bool = True, **kwargs):
        given = dict(zip(self._params, args), **kwargs)
        try:
            sample = self._native.run(list(self._flatten(given)))
        except RuntimeError as err:  # the C++ input checks, raised as the Python engine raises them
            message = str(err).splitlines()[0]
            if message.startswith(("sample ", "expected ")):
                raise ValueError(message) from None
            raise
        return EngineOutput(sample) if return_dict else (sample,)

    def reset(self) -> None:
        self._native.reset()

    def generation(self):
        raise NotImplementedError("the native runtime runs one generation at a time per engine: load one engine "
                                  "per concurrent generation (they can share the export directory)")

    @property
    def step(self) -> int:
        return self._native.step()

    @property
    def history(self) -> str:
        return self._native.history()
