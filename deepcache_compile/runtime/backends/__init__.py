"""Backends: one file each, behind a small registry. In-process compilation only (files are `artifacts/`' job).

A backend is a function `compile_graph(gm, example_inputs, options) -> callable` that turns one graph module
into a callable with the same positional signature; it gets the example inputs (so it can compile ahead of
time) and the user's options, and must not change the graph's numerics beyond what its compiler does. For
`compile_deepcache(..., dynamic=...)` it is also passed `ranges=` (a `ShapeRanges`): the callable must then
serve every shape in them (`graph.trace.export_program(gm, example_inputs, ranges)` exports it so).
A callable whose outputs live in buffers it overwrites on its next call (CUDA graphs) sets `static_outputs = True` on
itself: the pair then hands out copies (`runtime.pair.owned_outputs`). Optional dependencies are imported inside
the backend's module. `eager` compiles nothing: it is the reference
every other backend is verified against.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import fx

__all__ = ["Backend", "available_backends", "choose_backend", "get_backend", "graph_options", "register_backend",
           "registered_backend", "runnable_backends", "takes_compile_cache"]


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


# What `backend="auto"` picks, in order of preference (the first that is installed is taken). CPU fp32: measured by
# `deepcache-compile bench` (SD 1.5 architecture, 256 px, batch 2, 10 DDIM steps, N=5; README "Performance"):
# onnxruntime fastest, then inductor. CPU bf16/fp16: onnxruntime has no bf16 convolution on CPU (its session
# refuses the graph), so inductor: on an AVX512-BF16 machine, with its attention on the project's bf16 kernel,
# 3.40 s against 3.89 s with SDPA (bench/results/sd15_bf16_attention); aoti with the same kernel was 3.44 s
# against inductor's 3.69 in another run (bench/results/sd15_bf16_aoti_kernel) and 3.85 against 3.69 in a third
# (bench/results/sd15_bf16_cpp_wrapper): the same per graph, within the runs' spread, and it holds 1.6 GB more,
# so inductor stays. CUDA:
# not measured here (no GPU); TensorRT where installed, else inductor, until bench/gpu_check.sh's table says.
_FASTEST: dict[tuple[str, torch.dtype], tuple[str, ...]] = {
    ("cpu", torch.float32): ("onnxruntime", "inductor"),
    ("cpu", torch.bfloat16): ("inductor",),
    ("cpu", torch.float16): ("inductor",),
    ("cuda", torch.float32): ("tensorrt", "inductor"),
    ("cuda", torch.float16): ("tensorrt", "inductor"),
    ("cuda", torch.bfloat16): ("tensorrt", "inductor"),
}
# The Python package each backend needs beyond torch.
_NEEDS = {"onnxruntime": "onnxruntime", "tensorrt": "torch_tensorrt"}


def graph_options(name: str) -> tuple[str, ...]:
    """The options of backend `name` that choose graph passes (`graph.passes`) rather than compile settings: the
    module's `GRAPH_OPTIONS` (the inductor and aoti backends take "attention"); none for registered functions."""
    entry = _REGISTRY.get(name)
    return tuple(getattr(importlib.import_module(entry), "GRAPH_OPTIONS", ())) if isinstance(entry, str) else ()


def takes_compile_cache(name: str) -> bool:
    """Whether backend `name` stores its compiled graphs in a compile cache (`artifacts.cache`; its module sets
    `COMPILE_CACHE = True` and its `compile_graph` takes `cache=`): aoti."""
    entry = _REGISTRY.get(name)
    return isinstance(entry, str) and getattr(importlib.import_module(entry), "COMPILE_CACHE", False)


def available_backends() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _installed(name: str) -> bool:
    return name not in _NEEDS or importlib.util.find_spec(_NEEDS[name]) is not None


def runnable_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The built-in backends that run on `device` with what is installed (tensorrt needs CUDA)."""
    cuda = torch.device(device).type == "cuda"
    return tuple(name for name in ("eager", "inductor", "aoti", "onnxruntime", "tensorrt")
                 if _installed(name) and (cuda or name != "tensorrt"))


def choose_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """What `backend="auto"` compiles with on this device and dtype: the fastest that is installed, as measured
    by the benchmark (see `_FASTEST`); "inductor" where nothing was measured.

    Example:
        >>> choose_backend("cpu", torch.float32)  # with onnxruntime installed
        'onnxruntime'
    """
    device = torch.device(device)
    for name in _FASTEST.get((device.type, dtype), ("inductor",)):
        if _installed(name):
            return name
    return "inductor"


@contextlib.contextmanager
def registered_backend(name: str, compile_graph: Backend) -> Iterator[str]:
    """`register_backend` for the length of a block: the name is free again after it (tests, experiments).

    Example:
        >>> with registered_backend("mine", lambda gm, inputs, options: gm):
        ...     dc = compile_deepcache(unet, branch=1, backend="mine")
    """
    register_backend(name, compile_graph)
    try:
        yield name
    finally:
        _REGISTRY.pop(name, None)


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
