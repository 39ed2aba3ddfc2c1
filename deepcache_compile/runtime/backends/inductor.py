"""The `inductor` backend: `torch.compile` on each graph, compiled ahead of time on the example inputs.

Options are passed to `torch.compile` (`mode`, `fullgraph`, `dynamic`, `options`), plus `freezing`:
Inductor's freezing folds the (shared, read-only) weights into the compiled graph, which lets it pre-pack
convolution weights for oneDNN on CPU. It defaults to on for CPU inputs. A frozen graph keeps its own copy of
the weights it uses, so moving or editing the U-Net's weights afterwards does not reach it: compile again.

`attention`: "auto" (default), "native" or "sdpa", a graph option (`GRAPH_OPTIONS`: the pair applies it with the
other graph passes, `graph.passes`, before the graph reaches this backend). bf16 attention on CPUs with
AVX512-BF16 runs on the project's kernel (`graph.attention`, `kernels/attention.cpp`; PyTorch's SDPA gains
nothing from bf16 on CPU): "auto" takes it where it can run (else SDPA, and logs why), "native" requires it,
"sdpa" keeps PyTorch's SDPA everywhere.

With `ranges` (dynamic pairs) freezing defaults to off (see `compile_graph`), the batch and spatial dimensions
are marked dynamic without duck sizing (equal sizes stay separate symbols), and the graph is compiled ahead of
time at batch >= 2 and, where the range includes it, at batch 1 (Inductor specializes size-1 batches).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental import _config as fx_config

from ...options import check_options
from ...shapes import ShapeRanges, TracedSizes, with_batch

logger = logging.getLogger(__name__)

_COMPILE_KEYS = {"mode", "fullgraph", "dynamic", "options"}
GRAPH_OPTIONS = ("attention",)


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any],
                  ranges: ShapeRanges | None = None):
    check_options("the inductor backend", options, _COMPILE_KEYS | {"freezing", *GRAPH_OPTIONS})
    options = {k: v for k, v in options.items() if k not in GRAPH_OPTIONS}  # applied by graph.passes
    # Freezing with symbolic shapes fails in torch 2.13 on some U-Nets (the digits model: an AssertionError in
    # sym_max while materializing strides), so dynamic pairs default to weights as inputs.
    freezing = options.pop("freezing", example_inputs[0].device.type == "cpu" and ranges is None)
    options.setdefault("fullgraph", True)
    examples = [example_inputs] if ranges is None else _dynamic_examples(example_inputs, ranges, gm)
    if ranges is not None:
        options["dynamic"] = False  # only the dimensions marked by _dynamic_examples are symbolic
    compiled = torch.compile(gm, backend="inductor", **options)
    # Compile now, under the chosen freezing setting, instead of on the first denoising step.
    with torch._inductor.config.patch(freezing=freezing), _symbolic_sizes(), torch.no_grad():
        for inputs in examples:
            compiled(*inputs)
    logger.info("inductor compiled %s (freezing=%s, %d specializations)", type(gm).__name__, freezing, len(examples))
    run = compiled if ranges is None else _past_recompile_limit(compiled)
    if _cudagraphs(options, example_inputs[0].device):
        run = _Replayed(run)
    return run


def _symbolic_sizes():
    """How sizes are made symbolic while compiling: one symbol per marked dimension (no duck sizing: equal example
    sizes stay independent), and a view's re-trace does not equate two sizes because the example's are equal
    (`backed_size_oblivious`, as graph.trace.export_program exports: a (2, h, w) grid viewed as (2, 1, w, h) in
    diffusers' position tables would otherwise guard h == w at a square example, and recompile for the others)."""
    return fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)


def _cudagraphs(options: dict, device: torch.device) -> bool:
    """Whether Inductor runs the graph as a CUDA graph: mode "reduce-overhead" / "max-autotune", or the
    "triton.cudagraphs" option, on a CUDA device."""
    extra = options.get("options") or {}
    return device.type == "cuda" and (options.get("mode") in ("reduce-overhead", "max-autotune")
                                      or bool(extra.get("triton.cudagraphs")))


class _Replayed:
    """A CUDA-graphed callable: its outputs are overwritten by its next replay (`static_outputs`)."""

    static_outputs = True

    def __init__(self, run):
        self.run = run

    def __call__(self, *inputs):
        torch.compiler.cudagraph_mark_step_begin()
        return self.run(*inputs)


# How many specializations a dynamic pair's graph may reach (dynamo's own limit, 8 by default, is per function
# and global). Measured on the digits model over batch 1..4 x 8..24 px: see `_past_recompile_limit`.
SPECIALIZATION_LIMIT = 64
# dynamo's config is process-wide: one thread at a time raises the limit (compiles are serialized anyway).
_PAST_LIMIT = threading.Lock()


def _past_recompile_limit(compiled):
    """A dynamic pair's graph, let past dynamo's `recompile_limit` up to `SPECIALIZATION_LIMIT`.

    Why it recompiles at all: at batch 1 ATen picks a convolution's backend by the input's size (oneDNN when
    `batch > 1` or `C*H*W > 20480`, its native kernel otherwise), and the fake-tensor convolution asks the same
    question to choose the output layout, so every convolution whose `C*H*W` can cross 20,480 inside the ranges
    adds a guard, and each new side of those thresholds is one more specialization. Their number is bounded
    (one per region between thresholds), small models at small sizes have many (the digits U-Net: 8..24 px),
    and U-Nets with 320+ channels at latent sizes >= 8 none. Dynamo's limit (8, global) is lifted on the
    exceptional path only, so the per-call cost stays one function call; past `SPECIALIZATION_LIMIT` the calls
    fail with an error that says so and names the backends that never recompile (onnxruntime, aoti)."""

    def run(*inputs):
        try:
            return compiled(*inputs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            pass
        logger.info("a dynamic Inductor graph passed torch._dynamo.config.recompile_limit (%d): compiling one "
                    "more specialization for %s (up to %d)", torch._dynamo.config.recompile_limit,
                    [tuple(t.shape) for t in inputs[:1]], SPECIALIZATION_LIMIT)
        try:
            with _PAST_LIMIT, torch._dynamo.config.patch(recompile_limit=SPECIALIZATION_LIMIT), _symbolic_sizes():
                return compiled(*inputs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            raise RuntimeError(
                f"the dynamic Inductor graph was specialized {SPECIALIZATION_LIMIT} times (Inductor guards on "
                "sizes, at batch 1 on each side of ATen's convolution-backend thresholds): use "
                "backend='onnxruntime' or backend='aoti' for dynamic pairs (they do not recompile), or narrower "
                "ranges") from err

    run.compiled = compiled
    return run


def _dynamic_examples(example_inputs: tuple[torch.Tensor, ...], ranges: ShapeRanges, gm: nn.Module) -> list[tuple]:
    """Copies of the example inputs with the dimensions that vary over the ranges marked dynamic (batch, spatial
    sizes, and what the trace made symbolic: a transformer residual's token count); plus, where the batch range
    starts at 1, a batch-1 copy: Inductor specializes size-1 batches, so that case is a second specialization,
    compiled now rather than at the first batch-1 call."""
    examples = [example_inputs]
    if ranges.batch[0] == 1 and example_inputs[0].shape[0] > 1:
        examples.append(with_batch(example_inputs, 1))
    bounds = ranges.bounds(example_inputs, TracedSizes.of(gm, example_inputs))
    marked = []
    for inputs in examples:
        inputs = tuple(t.clone() for t in inputs)  # the marks stay on these copies
        for t, (lo, hi) in zip(inputs, bounds):
            for d in range(t.dim()):
                if lo[d] != hi[d] and (d > 0 or t.shape[0] > 1):
                    torch._dynamo.maybe_mark_dynamic(t, d)
        marked.append(inputs)
    return marked
