"""Backends: one file each, behind a small registry. In-process compilation only (files are `artifacts/`' job).

A backend is a function `compile_graph(gm, example_inputs, options) -> callable` that turns one graph module
into a callable with the same positional signature; it gets the example inputs (so it can compile ahead of
time) and the user's options, and must not change the graph's numerics beyond what its compiler does. For
`compile_deepcache(..., dynamic=...)` it is also passed `ranges=` (a `ShapeRanges`): the callable must then
serve every shape in them (`graph.trace.export_program(gm, example_inputs, ranges)` exports it so).
Optional dependencies are imported inside the backend's module. `eager` compiles nothing: it is the reference
every other backend is verified against.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch
from torch import fx

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]


class Backend(Protocol):
    def __call__(
        self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any], **shapes: Any
    ) -> Callable[..., tuple[torch.Tensor, ...]]: ...


_REGISTRY: dict[str, str | Backend] = {
    "eager": "deepcache_compile.runtime.backends.eager",
    "inductor": "deepcache_compile.runtime.backends.inductor",
    "aoti": "deepcache_compile.runtime.backends.aoti",
    "onnxruntime": "deepcache_compile.runtime.backends.onnxruntime",
    "tensorrt": "deepcache_compile.runtime.backends.tensorrt",
}


def available_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def register_backend(name: str, compile_graph: Backend) -> None:
    """Adds a backend under `name` (as torch.compile's backend registry does).

    Example:
        >>> register_backend("mine", lambda gm, inputs, options: gm)
        >>> dc = compile_deepcache(unet, branch=1, backend="mine")
    """
    if name in _REGISTRY:
        raise ValueError(f"backend {name!r} is already registered: choose another name")
    _REGISTRY[name] = compile_graph


def get_backend(name: str) -> Backend:
    """Returns the `compile_graph` function of the backend called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown: choose one of {available_backends()}")
    entry = _REGISTRY[name]
    return importlib.import_module(entry).compile_graph if isinstance(entry, str) else entry
