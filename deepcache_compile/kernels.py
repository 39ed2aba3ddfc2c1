"""The project's compute kernels in this process: `torch.ops.deepcache.*` from `kernels/attention.cpp`.

`make native` builds them into `deepcache_compile/_native/libdeepcache_kernels.so`. Graphs the compiler rewrites
call them (`graph.attention`), and so do the `aoti` packages compiled and exported from those graphs: a process
that runs such a graph loads the library first (`native_attention_missing` here; the C++ runtime links it).
`native_ops(graph)` lists the project's ops a graph calls (an export's manifest records them), `native_op_missing`
says why one cannot run here (the engine loader checks before it loads the packages).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import torch
from torch import fx

__all__ = ["KERNELS_LIBRARY", "native_attention_missing", "native_op_missing", "native_ops"]

KERNELS_LIBRARY = Path(__file__).resolve().parent / "_native" / "libdeepcache_kernels.so"
NAMESPACE = "deepcache"
ATTENTION_OP = f"{NAMESPACE}::attention_bf16"
_LOADING = threading.Lock()


def native_attention_missing() -> str | None:
    """Why `torch.ops.deepcache.attention_bf16` cannot run here, or None: loads the kernel library once (and
    registers the op's shape function for tracing and torch.compile); safe from several threads."""
    with _LOADING:
        return _load()


@functools.cache
def _load() -> str | None:
    if not KERNELS_LIBRARY.exists():
        return f"{KERNELS_LIBRARY} is not built (run `make native`)"
    torch.ops.load_library(str(KERNELS_LIBRARY))
    torch.library.register_fake(ATTENTION_OP)(_attention_shape)
    if not torch.ops.deepcache.attention_bf16_supported():
        return "this CPU has no AVX512-BF16 instructions"
    return None


def _attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's output: (batch, tokens, heads, dim) storage seen as (batch, heads, tokens, dim)."""
    batch, heads, tokens, dim = query.shape
    return query.new_empty((batch, tokens, heads, dim)).transpose(1, 2)


def native_op_missing(name: str) -> str | None:
    """Why the project's op `name` ("deepcache::attention_bf16") cannot run in this process, or None (loads its
    library); the same reasons as the C++ runtime's `native_op_missing` (kernels/kernels.h)."""
    if name == ATTENTION_OP:
        return native_attention_missing()
    return f"this runtime has no {name} (a newer deepcache_compile made it)"


def native_ops(graph: fx.Graph) -> list[str]:
    """The project's ops `graph` calls, by qualified name ("deepcache::attention_bf16"), sorted."""
    names = {node.target.name().split(".")[0] for node in graph.nodes
             if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
             and node.target.namespace == NAMESPACE}
    return sorted(names)
