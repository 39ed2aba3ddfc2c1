"""deepcache_compile: DeepCache as a compiler pass for diffusion U-Nets.

    from deepcache_compile import compile_deepcache, list_branches
    pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=5)

The names below are imported on first use, so `from deepcache_compile import load_deepcache` loads the engine
runtime alone: no graph pass, no compiler, no diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compile_deepcache": ".api",
    "list_branches": ".api",
    "BranchInfo": ".api",
    "DeepCacheConfig": ".config",
    "DeepCacheUNet": ".runtime.dispatch",
    "available_backends": ".runtime.backends",
    "register_backend": ".runtime.backends",
    "DeepCacheEngine": ".artifacts.engine",
    "load_deepcache": ".artifacts.load",
    "ManifestError": ".artifacts.manifest",
    "AdaptiveRefresh": ".refresh",
    "FirstBlockRefresh": ".refresh",
    "CalibratedPlan": ".refresh",
    "Int8": ".precision",
    "record_calls": ".precision",
    "Schedule": ".schedule",
    "Step": ".schedule",
    "ShapeRanges": ".shapes",
    "bound_onednn_caches": ".runtime.onednn",
}

__all__ = list(_EXPORTS)

# The built-in refresh policies register their names (`policy.register_policy`) here, where every entry point
# passes, rather than in each module that resolves `refresh="name"`.
from . import refresh as _refresh  # noqa: E402,F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deepcache_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

