"""One input signature -> a compiled (full, shallow) pair: trace, find branches, partition, compile."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import linecache
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..calls import CallFlattener, FlatCall
from ..config import DeepCacheConfig
from ..graph import quantize
from ..graph.branches import BranchNotFoundError, downsampling_factor, find_branches
from ..graph.cuts import Cut, find_cuts, select_cut
from ..graph.partition import SplitGraphs, ThreeGraphs, split_at_branch, split_three
from ..graph.passes import PassOptions, apply_passes
from ..graph.step import DeviceStep, device_step as step_module
from ..graph.trace import TracedUNet, UNetTraceError, forget_last_trace, trace_unet
from ..shapes import ShapeRanges, TracedSizes, sample_size, with_batch
from ..artifacts.cache import CompileCache
from .backends import get_backend, graph_options
from .generation import FORCE_CACHED, FORCE_FULL, GenerationState, StepGraphs, keep_cache, run_step, step_mode

logger = logging.getLogger(__name__)

__all__ = ["CompiledPair", "CompiledThree", "compile_pair", "int8_split", "shape_ranges", "release", "select_branch"]


@dataclass(frozen=True)
class CompiledThree:
    """The compiled head, deep and tail graphs (see `partition.ThreeGraphs`); the adaptive dispatcher runs them.

    Attributes:
        graphs: the graph modules before compilation.
        head: compiled `(*inputs) -> (*links)`.
        deep: compiled `(*inputs, *links) -> (cache,)`.
        tail: compiled `(*inputs, *links, cache[, slope, steps]) -> (sample,)`.
    """

    graphs: ThreeGraphs
    head: Callable[..., tuple[torch.Tensor, ...]]
    deep: Callable[..., tuple[torch.Tensor]]
    tail: Callable[..., tuple[torch.Tensor]]

    @property
    def probe(self) -> int:
        return self.graphs.probe


@dataclass(frozen=True)
class CompiledPair:
    """The compiled full and shallow graphs of one input signature, or of every shape in `ranges`.

    Attributes:
        traced: the exported U-Net both graphs were cut from.
        split: the graph modules before compilation.
        full: compiled `(*inputs) -> (sample, cache)`.
        shallow: compiled `(*inputs, cache) -> (sample,)`.
        ranges: None for a static pair (the traced shapes only); else the batch sizes and resolutions it serves.
        three: with the three-graph split, its compiled graphs (`full` and `shallow` then run them in turn).
        step: with split="step", the compiled step that decides on the device (`graph.step.DeviceStep`), and
            `device_step` the module (`full` and `shallow` then run it with the decision forced).
        forecast: the shallow graph takes `(*inputs, cache, slope, steps)` and extrapolates the cache.
        fx_sources: the keys of the generated sources torch.fx cached while compiling it (see `release`).
        owns_weights: every compiled graph holds its own copy of the weights (declared by the backend's callables
            with `owns_weights`): the U-Net's copy may be released (`DeepCacheUNet.release_weights`).
    """

    traced: TracedUNet
    split: SplitGraphs
    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shallow: Callable[..., tuple[torch.Tensor]]
    ranges: ShapeRanges | None = None
    three: CompiledThree | None = None
    forecast: bool = False
    fx_sources: frozenset[str] = field(default=frozenset(), repr=False)
    owns_weights: bool = False
    step: Callable | None = None
    device_step: DeviceStep | None = None

    @property
    def step_state(self):
        """What the step graph carries between calls (`policy.StepState`), with split="step"."""
        return None if self.device_step is None else self.device_step.state

    @property
    def branch(self) -> Cut:
        return self.split.branch

    def run_shallow(self, *inputs: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """Runs the shallow graph after checking that `cache` fits it (the dispatcher skips this check)."""
        shape, dtype = self.branch.cache_shape, self.branch.cache_dtype
        if self.ranges is not None:
            traced = TracedSizes.of(self.split.shallow)
            shape = traced.at(tuple(inputs[0].shape))[len(inputs)] if traced else ShapeRanges.shape_for(
                shape, tuple(self.traced.example_inputs[0].shape), tuple(inputs[0].shape))
        if tuple(cache.shape) != shape or cache.dtype != dtype:
            raise ValueError(
                f"cache of shape {tuple(cache.shape)} and dtype {cache.dtype} does not match the shallow graph's "
                f"cache input {shape}/{dtype} for branch {self.branch.index}: pass the cache returned by the full "
                "graph for the same input signature"
            )
        return self.shallow(*inputs, cache, *(keep_cache(cache) if self.forecast else ()))[0]


def select_branch(gm, config: DeepCacheConfig) -> Cut:
    """The cut `config` asks for in a traced model (`config.branch` among the cuts its finder offers)."""
    return select_cut(find_cuts(gm, **config.cut_options), config.branch)


def shape_ranges(unet: nn.Module, call: FlatCall, what: str, **ranges: tuple[int, int] | None) -> ShapeRanges:
    """`ShapeRanges` from the user's (min, max) `ranges` (batch, height, width), resolved for this U-Net: one
    static trace of `call` finds its downsampling factor. `what` names the caller in error messages.

    Transformers (no U-Net skips; a sample cut into patches) serve the example's resolution unless `height` or
    `width` ranges are given (in latent pixels, multiples of the patch); their batch is dynamic either way."""
    sample = call.tensors[0]
    with _fx_sources_added() as added:
        gm = trace_unet(unet, call).gm
    _release_sources(added)
    _clear_trace_caches()
    try:
        multiple = downsampling_factor(find_branches(gm), sample.shape[-2])
    except BranchNotFoundError:
        return _transformer_ranges(unet, sample, what, **ranges)
    if ranges.pop("tokens", None) is not None:
        raise ValueError(f"{what}: tokens= ranges a transformer's packed tokens; a U-Net takes height= and width=")
    resolved = ShapeRanges.resolve(multiple, sample_size(unet), **ranges, what=what)
    for name, (lo, hi), size in (("height", resolved.height, sample.shape[-2]), ("width", resolved.width,
                                                                                 sample.shape[-1])):
        if lo == hi != size:  # a one-size range stays static: the example is traced at that size
            raise ValueError(f"{what}: {name}=({lo}, {hi}) is one size, and the example's {name} is {size}: give "
                             f"an example of that size, or a range of sizes")
    return resolved


def _transformer_ranges(model: nn.Module, sample: torch.Tensor, what: str, batch=None, height=None,
                        width=None, tokens=None) -> ShapeRanges:
    patch = getattr(model.config, "patch_size", None)
    if sample.dim() == 3 and height is None and width is None:  # packed tokens (Flux): (batch, tokens, channels)
        own, channels = sample.shape[1:]
        if tokens is not None and not tokens[0] <= own <= tokens[1]:
            raise ValueError(f"{what}: tokens={tuple(tokens)} leaves out the example's {own} tokens: give an example "
                             "inside the range")
        return ShapeRanges.resolve(1, own, batch=batch, height=tuple(tokens or (own, own)),
                                   width=(channels, channels), what=what)
    if tokens is not None:
        raise ValueError(f"{what}: tokens= ranges the token count of a packed-token sample (batch, tokens, "
                         f"channels); {type(model).__name__} takes a sample of shape {tuple(sample.shape)}: give "
                         "height= and width= ranges instead")
    if isinstance(patch, (tuple, list)) and sample.dim() == 5 and patch[-1] == patch[-2]:
        patch = patch[-1]  # video (Wan): frames stay the example's, the spatial patch is square
    if sample.dim() not in (4, 5) or not isinstance(patch, int):
        raise ValueError(f"{what}: {type(model).__name__} takes a sample of shape {tuple(sample.shape)}; dynamic "
                         "ranges cover (batch, channels, [frames,] height, width) samples cut into square "
                         "patches and packed tokens (batch, tokens, channels; tokens=): compile it without "
                         "dynamic= (one pair per shape)")
    size = tuple(sample.shape[-2:])
    for name, given, own in (("height", height, size[0]), ("width", width, size[1])):
        if given is not None and (own < given[0] or own > given[1]):
            raise ValueError(f"{what}: {name}={tuple(given)} leaves out the example's {name} {own}: give an example "
                             f"inside the range")
    _check_position_table(model, what, height, width)
    # One resolution (the example's) unless a range is given: its token count is then the product of two
    # symbolic sizes (see graph.trace._position_tables_from_size for what diffusers' patch embeddings need).
    return ShapeRanges.resolve(patch, max(size), batch=batch, height=tuple(height or (size[0],) * 2),
                               width=tuple(width or (size[1],) * 2), what=what)


def _check_position_table(model: nn.Module, what: str, height, width) -> None:
    """Refuses sizes past a cropped position table (diffusers' `PatchEmbed` with `pos_embed_max_size`, SD3): the
    model raises there, and a graph traced over the range would fail with a size mismatch instead."""
    from diffusers.models.embeddings import PatchEmbed

    for m in model.modules():
        if isinstance(m, PatchEmbed) and m.pos_embed_max_size:
            most = m.pos_embed_max_size * m.patch_size
            for name, given in (("height", height), ("width", width)):
                if given is not None and given[1] > most:
                    raise ValueError(f"{what}: {name}={tuple(given)} reaches past {type(model).__name__}'s position "
                                     f"table ({m.pos_embed_max_size} patches of {m.patch_size}: at most {most} "
                                     f"latent pixels): use {name}=({given[0]}, {most})")


def compile_pair(unet: nn.Module, call: FlatCall, config: DeepCacheConfig,
                 ranges: ShapeRanges | None = None) -> CompiledPair:
    """Traces `unet` for the signature of `call` (or, given `ranges`, for every shape in them), cuts it at
    `config.branch` and compiles both graphs.

    Example:
        >>> call = CallFlattener(unet)(args, kwargs)
        >>> pair = compile_pair(unet, call, DeepCacheConfig(branch=1))
        >>> sample, cache = pair.full(*call.tensors)
    """
    with _fx_sources_added() as added:
        pair = _compile_pair(unet, call, config, ranges)
    return dataclasses.replace(pair, fx_sources=frozenset(added))


def _compile_pair(unet: nn.Module, call: FlatCall, config: DeepCacheConfig, ranges: ShapeRanges | None) -> CompiledPair:
    if ranges is not None:
        call = dynamic_example(call, ranges)
    traced, padded_to = trace_in_ranges(unet, call, ranges, config)
    branch = select_branch(traced.gm, config)
    split = split_at_branch(traced.gm, branch)
    tolerance = None
    if config.quantize is not None:
        float_split, split = split, int8_split(unet, split, call, config)
        if config.backend != "eager" and config.verify:
            tolerance = int8_tolerance(float_split, split, traced.example_inputs)
    elif config.backend != "eager" and config.verify and quantized_elsewhere(unet):
        tolerance = INT8_TOLERANCE
    backend = get_backend(config.backend)
    # Static-only backends need not know the word; a model traced from batch 2 is compiled from there too.
    shapes = {"ranges": ranges if padded_to == 1 else dataclasses.replace(ranges, batch=(padded_to, ranges.batch[1]))
              } if ranges is not None else {}
    if config.cache_dir is not None:
        shapes["cache"] = CompileCache.at(config.cache_dir)
    passes = PassOptions(forecast=config.forecast, who=f"the {config.backend} backend",
                         attention=config.backend_options.get("attention", "auto")
                         if "attention" in graph_options(config.backend) else None)

    compiled = []

    def compile_graph(gm, part, inputs):
        compiled.append(backend(apply_passes(gm, part, passes), inputs, config.backend_options, **shapes))
        return owned_outputs(compiled[-1])

    step = device_step = None
    with torch.no_grad():
        if config.graphs == "three":
            three = _compile_three(split_three(traced.gm, branch), traced.example_inputs, compile_graph, config.forecast)
            full, shallow = _run_three(three, config.forecast)
        elif config.graphs == "step":
            inputs = traced.example_inputs
            device_step = step_module(split_three(traced.gm, branch), config.policy, passes, len(inputs))
            compiled.append(backend(device_step, device_step.example(*inputs), config.backend_options, **shapes))
            step = owned_outputs(compiled[-1])
            full, shallow = _forced(step, device_step)
        else:
            three, (full, shallow) = None, _compile_two(split, traced.example_inputs, compile_graph, config.forecast)
            if padded_to > 1:
                full, shallow = _padded(full, padded_to), _padded(shallow, padded_to)
    if config.backend != "eager":
        forget_last_trace()  # a backend's trace would otherwise keep what it traced (and folded) alive
        gc.collect()
    pair = CompiledPair(traced=traced, split=split, full=full, shallow=shallow, ranges=ranges,
                        three=None if step is not None else three, forecast=config.forecast, step=step,
                        device_step=device_step,
                        owns_weights=all(getattr(c, "owns_weights", False) for c in compiled))
    if config.backend != "eager" and config.verify:
        verify_pair(pair, config.backend, tolerance)
    return pair


def int8_split(unet: nn.Module, split: SplitGraphs, call: FlatCall, config: DeepCacheConfig,
                ranges: ShapeRanges | None = None) -> SplitGraphs:
    """The pair's graphs quantized to int8 (`precision`): observed, calibrated by replaying the recorded calls of
    this signature (given `ranges`: of every shape in them) on the config's policy, and quantized. The shallow
    graph sees every step: on cached steps the cache as it is kept (without forecast), on full steps the fresh
    one (so a plan without cached steps still calibrates it)."""
    flatten = CallFlattener(unet)
    calls = [c for c in (flatten(args, kwargs) for args, kwargs in config.quantize.calls) if _fits(c, call, ranges)]
    if not calls:
        shapes = [tuple(t.shape) for t in call.tensors]
        where = f"tensor shapes {shapes}" if ranges is None else f"ranges {ranges}"
        raise ValueError(f"int8: none of the {len(config.quantize.calls)} recorded calls has this call's input "
                         f"signature ({where}): record generations at this size and batch (record_calls) and pass "
                         "them in Int8(calls)")
    keep, keep_input = config.quantize.keep, config.quantize.keep_input
    quantize.check_keep(split.full, keep)  # the full graph holds every layer
    full, shallow = (quantize.observe(gm, keep, keep_input, config.quantize.seven_bit)
                     for gm in (split.full, split.shallow))

    def observed_full(*inputs):
        sample, cache = full(*inputs)
        shallow(*inputs, cache)
        return sample, cache

    state = GenerationState(config.calls_per_step)
    for recorded in calls:
        run_step(state, config.policy, recorded, StepGraphs(full=observed_full, shallow=shallow))
    logger.info("int8: calibrated on %d calls (%s)", len(calls), state.history)
    return dataclasses.replace(split, full=quantize.quantize(full), shallow=quantize.quantize(shallow))


def _fits(recorded: FlatCall, call: FlatCall, ranges: ShapeRanges | None) -> bool:
    """Whether a recorded call runs on the graphs traced for `call`: the same signature, or, for graphs with
    symbolic sizes, the same inputs (names, dtypes, ranks) at a shape inside `ranges`."""
    if ranges is None:
        return recorded.signature == call.signature
    same = recorded.signature[0] == call.signature[0] and recorded.signature[2] == call.signature[2] and all(
        a.dtype == b.dtype and a.dim() == b.dim() for a, b in zip(recorded.tensors, call.tensors))
    try:
        ranges.check(tuple(recorded.tensors[0].shape))
    except ValueError:
        return False
    return same


def owned_outputs(compiled: Callable) -> Callable:
    """`compiled` as it is, or, where it declares `static_outputs` (CUDA graphs: every replay writes its outputs
    into the same buffers), wrapped to return copies. The cache of a full step must survive the shallow steps
    that follow (and, with calls_per_step=2, the other call's outputs the scheduler has not read yet): the
    dispatcher never keeps a buffer a graph may overwrite."""
    if not getattr(compiled, "static_outputs", False):
        return compiled

    def copied(*inputs):
        return tuple(t.clone() for t in compiled(*inputs))

    return copied


def trace_in_ranges(unet: nn.Module, call: FlatCall, ranges: ShapeRanges | None, config: DeepCacheConfig
                    ) -> tuple[TracedUNet, int]:
    """The trace of `call` (over `ranges`), and the batch that smaller calls are padded up to (1: none).

    Some models do not trace with a batch range that includes 1: SD3's and Flux's joint attention applies a
    linear to a slice of the joint stream, which `torch.export` guards as `batch != 1`. Such a model is traced
    from batch 2 and its batch-1 calls run as two equal rows, the second dropped (the full/shallow pair only;
    engine files record it as the manifest's `pad_batch`)."""
    try:
        return trace_unet(unet, call, ranges), 1
    except UNetTraceError as err:
        if ranges is None or ranges.batch[0] != 1 or "Constraints violated (batch)" not in str(err):
            raise
        if config.graphs != "pair":
            raise UNetTraceError(f"{err}\n{type(unet).__name__} does not trace with a batch range from 1: pass "
                                 f"dynamic=dict(batch=(2, {ranges.batch[1]})) (export: batch=(2, "
                                 f"{ranges.batch[1]})), or use the full/shallow pair (no adaptive refresh, split or "
                                 "device policy), which pads batch-1 calls") from err
        from_two = dataclasses.replace(ranges, batch=(2, ranges.batch[1]))
        traced = trace_unet(unet, call, from_two)
        logger.info("%s traced with batch 2..%d (a batch of 1 is guarded out): batch-1 calls run padded to 2 rows",
                    type(unet).__name__, ranges.batch[1])
        return traced, 2


def _padded(graph: Callable, rows: int) -> Callable:
    """`graph` for calls of fewer than `rows` rows: batched inputs repeated row-wise up to `rows`, outputs cut back
    (the cached feature too: a shallow call pads it again as it pads the other inputs)."""

    def run(*inputs):
        n = inputs[0].shape[0]
        if n >= rows:
            return graph(*inputs)
        return tuple(out[:n] if out.dim() and out.shape[0] == rows else out
                     for out in graph(*with_batch(inputs, rows)))

    return run


def _compile_two(split: SplitGraphs, inputs: tuple, compile_graph: Callable, forecast: bool) -> tuple:
    """`compile_graph(gm, part, inputs)` applies the graph passes (forecast among them) and the backend."""
    full = compile_graph(split.full, "full", inputs)
    # The cache as the compiled full graph lays it out (Inductor may choose channels-last), so the shallow
    # graph is compiled for the tensors it will get.
    cache = full(*inputs)[1]
    return full, compile_graph(split.shallow, "shallow", (*inputs, cache, *(keep_cache(cache) if forecast else ())))


def _compile_three(graphs: ThreeGraphs, inputs: tuple, compile_graph: Callable, forecast: bool) -> CompiledThree:
    head = compile_graph(graphs.head, "head", inputs)
    links = tuple(head(*inputs))
    deep = compile_graph(graphs.deep, "deep", (*inputs, *links))
    (cache,) = deep(*inputs, *links)
    tail = compile_graph(graphs.tail, "tail", (*inputs, *links, cache, *(keep_cache(cache) if forecast else ())))
    return CompiledThree(graphs, head, deep, tail)


def _run_three(three: CompiledThree, forecast: bool) -> tuple[Callable, Callable]:
    """`full` and `shallow` with the two-graph pair's signatures, running head -> deep -> tail and head -> tail."""
    head, deep, tail = three.head, three.deep, three.tail

    def full(*inputs):
        links = head(*inputs)
        (cache,) = deep(*inputs, *links)
        return tail(*inputs, *links, cache, *(keep_cache(cache) if forecast else ()))[0], cache

    def shallow(*inputs_and_cache):
        n = len(inputs_and_cache) - (3 if forecast else 1)
        inputs = inputs_and_cache[:n]
        return tail(*inputs, *head(*inputs), *inputs_and_cache[n:])

    return full, shallow


def _forced(step: Callable, module: DeviceStep) -> tuple[Callable, Callable]:
    """`full` and `shallow` with the two-graph pair's signatures, running the step graph with its decision forced
    (mode 1 and 2): calibration, verification and the benchmark's per-graph timings use them."""
    def full(*inputs):
        sample, cache, *_ = step(*inputs, *module.initial_state(*inputs), step_mode(FORCE_FULL, inputs[0].device))
        return sample, cache

    def shallow(*inputs_and_cache):
        inputs, cache = inputs_and_cache[:-1], inputs_and_cache[-1]
        _, reference, drift, run = module.initial_state(*inputs)
        return step(*inputs, cache, reference, drift, run, step_mode(FORCE_CACHED, inputs[0].device))[:1]

    return full, shallow


def release(pair: CompiledPair) -> None:
    """Frees what torch keeps of a dropped pair after the pair itself is gone: every fx `GraphModule` recompile
    caches its generated source (and a linecache entry) in a process-wide table that is never emptied, so a
    server that compiles pair after pair (new shapes through the LRU, recompiles after weight changes) would
    grow without bound. Runs of the pair already under way are unaffected (their code is compiled)."""
    _release_sources(pair.fx_sources)
    _clear_trace_caches()


def _clear_trace_caches() -> None:
    """Empties what torch.export's tracing keeps process-wide: fake-tensor dispatch results keyed by shape
    (about 150 per trace of the digits U-Net), and the `functools.lru_cache`s on `ShapeEnv` methods, which are
    keyed by the `ShapeEnv` itself and so keep every trace's shape environment (its fake tensors, guards and
    symbols: about 0.3 MB per digits trace) alive forever. Live pairs never trace again, so clearing costs
    nothing but a slower next trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    FakeTensorMode.cache_clear()
    for method in vars(ShapeEnv).values():
        if hasattr(method, "cache_clear"):
            method.cache_clear()


@contextlib.contextmanager
def _fx_sources_added() -> Iterator[set[str]]:
    loader = getattr(torch.fx.graph_module, "_loader", None)  # torch's private source cache (see `release`)
    before = set(loader.eval_cache) if loader is not None else set()
    added: set[str] = set()
    try:
        yield added
    finally:
        if loader is not None:
            added |= set(loader.eval_cache) - before


def _release_sources(keys) -> None:
    loader = getattr(torch.fx.graph_module, "_loader", None)
    for key in keys:
        if loader is not None:
            loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)


def dynamic_example(call: FlatCall, ranges: ShapeRanges) -> FlatCall:
    """A batch-1 example traces size-1 specializations into the graph: trace dynamic pairs at batch >= 2."""
    sample = call.tensors[0]
    if sample.shape[0] >= 2 or ranges.batch[1] < 2:
        return call
    return call.with_tensors(with_batch(call.tensors, 2))


# Per-call agreement a compiled graph must reach with the eager graph on the example inputs: rounding-level
# differences pass, a miscompilation does not (relative max error, per dtype; bench/gpu_check.py's bound too).
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# int8 graphs against their eager form (quantize/dequantize in float): oneDNN requantizes some outputs in int8
# (int8 in, int8 out), where a rounding step can fall the other way, and in a deep network such steps add up
# (SD 1.5 with random weights: 0.0505 relative max). The bound is 0.1, or the int8 graph's own distance from the
# float graph where that is larger: a kernel may differ from the reference by what quantizing costs, and a
# miscompilation is O(1) beyond it.
INT8_TOLERANCE = 0.1


def quantized_elsewhere(unet: nn.Module) -> bool:
    """Whether the model's weights were quantized by another library before compiling (tensor-subclass weights,
    e.g. torchao's `quantize_`: int8 or float8 weights with activations quantized at run time). The compiled graph
    rounds some activations to the other quantization step than eager does, so the pair is verified within
    `INT8_TOLERANCE`, as an int8 pair is (a tiny Flux with torchao's dynamic int8: 0.006 relative max)."""
    return any(is_traceable_wrapper_subclass(p) for p in unet.parameters())


def int8_tolerance(float_split: SplitGraphs, int8: SplitGraphs, inputs: tuple) -> float:
    """The verification bound of an int8 pair: `INT8_TOLERANCE`, or the eager int8 full graph's relative max
    distance from the float one on the example inputs, whichever is larger (one eager call of each)."""
    with torch.no_grad():
        reference, quantized = float_split.full(*inputs)[0].float(), int8.full(*inputs)[0].float()
    distance = ((quantized - reference).abs().max() / reference.abs().max().clamp_min(1e-6)).item()
    return max(INT8_TOLERANCE, distance)


def verify_pair(pair: CompiledPair, backend: str, tolerance: float | None = None) -> None:
    """Runs both compiled graphs once against the eager graphs; raises RuntimeError on a mismatch.

    Costs one eager and one compiled call of each graph, once per signature, outside the hot path.
    """
    inputs = pair.traced.example_inputs
    with torch.no_grad():
        expected, cache = pair.split.full(*inputs)
        if pair.forecast:  # cache + slope * steps with slope = cache / 2 and one step: the shallow graph on 1.5 cache
            extra = (cache / 2, torch.ones((), dtype=cache.dtype, device=cache.device))
            shallow, reference = pair.shallow(*inputs, cache, *extra), pair.split.shallow(*inputs, cache * 1.5)
        else:
            shallow, reference = pair.shallow(*inputs, cache), pair.split.shallow(*inputs, cache)
        checks = (("full", pair.full(*inputs)[0], expected), ("shallow", shallow[0], reference[0]))
    for part, actual, reference in checks:
        error = ((actual.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-6)).item()
        if not error <= (tolerance or VERIFY_TOLERANCE.get(reference.dtype, 1e-3)):
            raise RuntimeError(
                f"the {backend} backend's {part} graph differs from the eager graph by {error:.3g} (relative max) "
                f"for branch {pair.branch.index}: a miscompilation. Use another backend (see available_backends()), "
                "or pass verify=False to compile_deepcache to skip this check"
            )
