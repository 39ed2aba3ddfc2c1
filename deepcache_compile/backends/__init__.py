"""Backends: one file each, behind a small registry.

A backend turns one graph module into a callable with the same positional signature. `compile_graph` gets
the example inputs (so it can compile ahead of time) and the user's options; it must not change the graph's
numerics beyond what its compiler does. Optional dependencies are imported inside the backend's function.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch
from torch import fx

__all__ = ["Backend", "get_backend", "available_backends"]


class Backend(Protocol):
    def __call__(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]
    ) -> Callable[..., tuple[torch.Tensor, ...]]: ...


_REGISTRY = {
    "eager": "deepcache_compile.backends.eager",
    "inductor": "deepcache_compile.backends.inductor",
    "aoti": "deepcache_compile.backends.aoti",
    "onnxruntime": "deepcache_compile.backends.onnxruntime",
    "tensorrt": "deepcache_compile.backends.tensorrt",
}


def available_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
    """Returns the `compile_graph` function of the backend called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown: choose one of {available_backends()}")
    return importlib.import_module(_REGISTRY[name]).compile_graph
