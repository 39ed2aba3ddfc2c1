"""A graph pass: bf16 attention on the project's CPU kernel instead of PyTorch's SDPA.

PyTorch's CPU SDPA kernel gains nothing from bf16: 65-85 GFLOP/s at head dims 32-80 in bf16 as in fp32, on a
CPU whose bf16 matmul peaks at 433 GFLOP/s (bench/attention_forms.py), and attention is then a third of a bf16
shallow step of SD 1.5. `kernels/attention.cpp` (built by `make native` into `deepcache_compile/_native/
libdeepcache_kernels.so`) computes the same attention with AVX512-BF16 dot products, fp32 accumulation and an
fp32 softmax: `torch.ops.deepcache.attention_bf16(query, key, value, scale)`.

`substitute_attention(gm)` returns a copy of the graph (sharing its weights) in which every SDPA call the kernel
computes is replaced by it: bf16 CPU tensors of shape (batch, heads, tokens, head dim), no mask, no dropout,
not causal, no grouped-query broadcasting, one head dim for query, key and value. Other calls stay SDPA.
`attention_calls(gm)` counts them, `kernels.native_attention_missing()` says why the kernel cannot run in this
process (None when it can), `with_native_attention(gm, attention, who)` applies the pass as the `inductor` and
`aoti` backends' option `attention` says (and `dc.export(format="aoti")`'s). Eager stays the reference and runs
SDPA.

On CPUs with AMX the kernel loses: PyTorch's SDPA runs its bf16 products on AMX tiles and was 2.6-3.2x faster
on self-attention (64 to 4,096 tokens) and even on cross-attention (0.96-1.04x) on a 2-core Xeon with AMX
(bench/results/attention_forms_amx.md, 2026-12-07), so "auto" keeps SDPA there (`amx_prefers_sdpa`).

Example:
    >>> if native_attention_missing() is None:
    ...     gm, replaced = substitute_attention(gm)
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from ..kernels import native_attention_missing
from .cuts import same_sizes

__all__ = ["ATTENTION_CHOICES", "attention_calls", "substitute_attention", "with_native_attention"]

logger = logging.getLogger(__name__)
ATTENTION_CHOICES = ("auto", "native", "sdpa")

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


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


def with_native_attention(gm: fx.GraphModule, attention: str, who: str) -> fx.GraphModule:
    """`gm`, or a copy with the kernel in place of the SDPA calls it computes, as a backend's `attention` option
    says: "auto" takes the kernel where it can run and is faster (not on CPUs with AMX; else keeps SDPA and logs
    why), "native" requires it (an error says why it cannot run), "sdpa" keeps SDPA. `who` ("the inductor
    backend") names the caller in errors."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{who}: attention={attention!r} is unknown; choose one of {ATTENTION_CHOICES}")
    if attention == "sdpa":
        return gm
    calls = attention_calls(gm)
    if calls == 0:
        if attention == "native":
            raise RuntimeError(f"{who}: attention='native' found no attention it computes (it takes bf16 CPU SDPA "
                               "calls without mask, dropout or causal masking); pass attention='sdpa' or 'auto'")
        return gm
    if attention == "auto" and amx_prefers_sdpa():
        logger.info("%s: %d bf16 attention calls stay SDPA: this CPU has AMX, on which SDPA is faster", who, calls)
        return gm
    missing = native_attention_missing()
    if missing is not None:
        if attention == "native":
            raise RuntimeError(f"{who}: attention='native' cannot run: {missing}; or pass attention='sdpa'")
        logger.info("%s: %d bf16 attention calls stay SDPA: %s", who, calls, missing)
        return gm
    substituted, replaced = substitute_attention(gm)
    logger.info("%s: %d attention calls on the native bf16 kernel", who, replaced)
    return substituted


def amx_prefers_sdpa() -> bool:
    """Whether this CPU has AMX tiles, where PyTorch's bf16 SDPA beats the kernel (see the module's note)."""
    return torch.cpu._is_amx_tile_supported()


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
    shapes_ok = (all(t.dim() == 4 for t in tensors) and same_sizes(query.shape[:2], key.shape[:2])
                 and same_sizes(key.shape[:2], value.shape[:2]) and same_sizes(query.shape[3:], key.shape[3:])
                 and same_sizes(key.shape[2:], value.shape[2:]))
    if not (shapes_ok and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
            and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("is_causal")
            and not kwargs.get("enable_gqa") and isinstance(query.shape[3], int)):
        return None
    scale = kwargs.get("scale")
    return (*inputs, float(scale) if scale is not None else query.shape[3] ** -0.5)
