"""A graph pass: bf16 attention on the project's CPU kernel instead of PyTorch's SDPA.

PyTorch's CPU SDPA kernel gains nothing from bf16: 65-85 GFLOP/s at head dims 32-80 in bf16 as in fp32, on a
CPU whose bf16 matmul peaks at 433 GFLOP/s (bench/attention_forms.py), and attention is then a third of a bf16
shallow step of SD 1.5. `kernels/attention.cpp` (built by `make native` into `deepcache_compile/_native/
libdeepcache_kernels.so`) computes the same attention with AVX512-BF16 dot products, fp32 accumulation and an
fp32 softmax: `torch.ops.deepcache.attention_bf16(query, key, value, scale)`.

`substitute_attention(gm)` returns a copy of the graph (sharing its weights) in which every SDPA call the kernel
computes is replaced by it: bf16 CPU tensors of shape (batch, heads, tokens, head dim), no mask, no dropout,
not causal, no grouped-query broadcasting, one head dim for query, key and value. Other calls stay SDPA.
`attention_calls(gm)` counts them, `native_attention_missing()` says why the kernel cannot run in this process
(None when it can). The Inductor backend applies the pass (option `attention`); eager stays the reference and
runs SDPA.

Example:
    >>> if native_attention_missing() is None:
    ...     gm, replaced = substitute_attention(gm)
"""

from __future__ import annotations

import copy
import functools
import threading
from pathlib import Path

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

__all__ = ["KERNELS_LIBRARY", "attention_calls", "native_attention_missing", "substitute_attention"]

KERNELS_LIBRARY = Path(__file__).resolve().parents[1] / "_native" / "libdeepcache_kernels.so"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


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
    torch.library.register_fake("deepcache::attention_bf16")(_attention_shape)
    if not torch.ops.deepcache.attention_bf16_supported():
        return "this CPU has no AVX512-BF16 instructions"
    return None


def _attention_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's output: (batch, tokens, heads, dim) storage seen as (batch, heads, tokens, dim)."""
    batch, heads, tokens, dim = query.shape
    return query.new_empty((batch, tokens, heads, dim)).transpose(1, 2)


def attention_calls(gm: fx.GraphModule) -> int:
    """How many SDPA calls of `gm` the kernel computes (no library needed)."""
    return sum(node.target is _SDPA and _kernel_args(node) is not None for node in gm.graph.nodes)


def substitute_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (same weights, new graph) with the kernel in place of each SDPA call it computes, and how
    many it replaced. `gm` itself is not changed. Needs `native_attention_missing()` to be None."""
    graph = copy.deepcopy(gm.graph)  # nodes (their meta shallow-copied) and the codegen: pytree in/out
    replaced = 0
    for node in list(graph.nodes):
        args = _kernel_args(node) if node.target is _SDPA else None
        if args is None:
            continue
        with graph.inserting_before(node):
            kernel = graph.call_function(torch.ops.deepcache.attention_bf16.default, args)
        kernel.meta = dict(node.meta)
        node.replace_all_uses_with(kernel)
        graph.erase_node(node)
        replaced += 1
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__), replaced


def _kernel_args(node: fx.Node) -> tuple | None:
    """(query, key, value, scale) for the kernel, from an SDPA call it computes; else None."""
    call = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if call is None:
        return None
    kwargs = call.kwargs
    inputs = tuple(kwargs[name] for name in ("query", "key", "value"))
    tensors = [getattr(x, "meta", {}).get("val") for x in inputs]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    query, key, value = tensors
    shapes_ok = (all(t.dim() == 4 for t in tensors) and query.shape[:2] == key.shape[:2] == value.shape[:2]
                 and query.shape[3] == key.shape[3] == value.shape[3] and key.shape[2] == value.shape[2])
    if not (shapes_ok and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
            and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("is_causal")
            and not kwargs.get("enable_gqa") and isinstance(query.shape[3], int)):
        return None
    scale = kwargs.get("scale")
    return (*inputs, float(scale) if scale is not None else query.shape[3] ** -0.5)
