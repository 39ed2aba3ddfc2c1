"""DeepCacheUNet: the drop-in replacement for `pipe.unet` that alternates the full and shallow graphs.

Plain Python outside every compiled region. Per call it flattens the inputs, looks up the compiled pair of
their signature (tracing it on first sight), decides FULL or SHALLOW from an integer call counter and the
schedule (`generation.run_step`), and runs one graph. It never reads a tensor on an accelerator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import itertools
import logging
import threading
import typing
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..calls import CallFlattener, FlatCall
from ..config import DeepCacheConfig
from ..graph.trace import forget_last_trace
from ..policy import RefreshPolicy
from ..refresh import CalibratedPlan
from ..schedule import Schedule
from ..shapes import ShapeRanges, shape_class
from .generation import GenerationStates, check_finite, run_step, timestep_mark
from .pair import CompiledPair, compile_pair, release, shape_ranges

logger = logging.getLogger(__name__)

__all__ = ["DeepCacheUNet", "weights_fingerprint"]


def weights_fingerprint(unet: nn.Module) -> tuple[tuple, tuple]:
    """(structure, state) of the weights compiled pairs are built from, in microseconds per parameter.

    structure: every parameter's and buffer's name, dtype and device (a LoRA adapter, `.to(dtype)` change it);
    state: their storage and version counter (`load_state_dict`, in-place edits under `no_grad`, `p.data = x`).
    Edits through `p.data` in place (`p.data += d`) bump no version counter and stay invisible: call
    `dc.recompile()` after those.
    """
    tensors = list(itertools.chain(unet.named_parameters(), unet.named_buffers()))
    structure = tuple((name, t.dtype, t.device) for name, t in tensors)
    return structure, tuple((t.data_ptr(), t._version) for _, t in tensors)


class _PairCache:
    """The compiled pairs of one U-Net and configuration, the lock that serializes compiling, and the weights
    they were compiled from. Shared by `with_schedule` copies.

    `pairs` maps each input signature seen lately (an LRU of `max_signatures`) to the pair that runs it: its
    own static pair, or the dynamic pair of its `shape_class` (`dynamic`, an LRU as well), which many
    signatures share. The per-call lookup is one dict access either way.
    """

    def __init__(self, max_signatures: int):
        self.max_signatures = max_signatures
        self.pairs: OrderedDict[Any, CompiledPair] = OrderedDict()
        self.dynamic: OrderedDict[Any, CompiledPair] = OrderedDict()
        self.ranges: ShapeRanges | None = None
        self.lock = threading.Lock()
        self.fingerprint: tuple | None = None
        self.released = False  # the U-Net's weights were released: nothing can be compiled any more

    def put(self, table: OrderedDict, key: Any, pair: CompiledPair) -> CompiledPair:
        table[key] = pair
        if len(table) > self.max_signatures:
            _, evicted = table.popitem(last=False)
            if table is self.dynamic or evicted.ranges is None:  # not an alias of a dynamic pair still held
                release(evicted)
        return pair

    def clear(self) -> None:
        for pair in {id(p): p for p in (*self.pairs.values(), *self.dynamic.values())}.values():
            release(pair)
        self.pairs.clear()
        self.dynamic.clear()
        self.fingerprint = None


def _output_type(unet: nn.Module) -> type | None:
    annotation = inspect.signature(unet.forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and "sample" in getattr(candidate, "__dataclass_fields__", {}):
            return candidate
    if type(unet).__module__.startswith("diffusers.models.transformers"):  # annotated loosely (Wan: a Union)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput
    return None


class DeepCacheUNet(nn.Module):
    """A U-Net that runs DeepCache: full steps on the schedule, shallow steps reusing the cached feature.

    Same forward signature and return type as the wrapped U-Net; other attributes (`config`, `dtype`,
    `device`, `add_embedding`, ...) are read from it, so it stands in for `pipe.unet`. The wrapped U-Net is
    not modified; it is a submodule, so `.to()` and offloading hooks move the weights the graphs use.

    Thread-safe: each thread runs its own generation (counter and cache) on the shared compiled pairs, and a
    signature is compiled once even when several threads meet it at once. For generations interleaved within
    one thread (asyncio), give each its own state with `with dc.generation(): ...`.

    Shapes: one static pair per input signature (an LRU of `max_signatures`), or with `dynamic` one pair for
    every shape in its ranges (see `compile_deepcache`).

    Weights that change: at the first call of each generation (never per step) the U-Net's weights are
    compared with those the pairs were compiled from (`weights_fingerprint`). Backends that bake weights in
    (Inductor with freezing, AOTInductor, ONNX Runtime, TensorRT) and any change of structure (a LoRA adapter,
    a dtype) need new pairs: by `on_weight_change` they are dropped and compiled again, or an error is raised.
    Eager graphs share the U-Net's parameters and follow value changes without recompiling.

    Example:
        >>> dc = DeepCacheUNet(unet, DeepCacheConfig(branch=1))
        >>> out = dc(latents, t, encoder_hidden_states=text).sample
    """

    def __init__(self, unet: nn.Module, config: DeepCacheConfig):
        super().__init__()
        self.unet = unet
        self.deepcache_config = config
        self.flatten = CallFlattener(unet)
        self._output_type = _output_type(unet)
        self._cache = _PairCache(config.max_signatures)
        self._states = GenerationStates(config.calls_per_step)
        self._warned_no_mark = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            unet = self._modules.get("unet")
            if unet is None:
                raise
            return getattr(unet, name)

    def forward(self, *args, **kwargs):
        call = self.flatten(args, kwargs)
        state, mark = self._states.current(), timestep_mark(call.timestep)
        if state.starts_generation(call.signature, mark):
            check_finite(call.tensors, call.names)
            self._check_weights()
        sample = run_step(state, self.deepcache_config.policy, call, self.pair_for(call), mark)
        if call.return_dict and self._output_type is not None:
            return self._output_type(sample=sample)
        return (sample,)

    def reset(self) -> None:
        """Forgets this thread's (or this `generation()` block's) cache and step count: the next call is step 0
        of a new generation (a full step)."""
        self._states.current().reset()

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Runs the calls inside the block as one generation with its own counter and cache.

        Example:
            >>> async def serve(prompt):
            ...     with pipe.unet.generation():
            ...         return await asyncio.to_thread(pipe, prompt)
        """
        with self._states.generation():
            yield

    def full_steps(self, total: int | None = None) -> list[int]:
        """The full-step indices (per call slot) of a generation of `total` steps."""
        return self.deepcache_config.schedule.full_steps(total)

    @property
    def step(self) -> int:
        """Index of the next step within the current generation."""
        return self._states.current().step

    @property
    def history(self) -> str:
        """What the current (or last) generation ran, one letter per U-Net call: "F" full, "S" shallow.

        Example:
            >>> pipe(prompt, num_inference_steps=7); pipe.unet.history
            'FSSFSSF'
        """
        return self._states.current().history

    @property
    def pairs(self) -> tuple[CompiledPair, ...]:
        """The compiled pairs held now, least recently used first: at most `max_signatures` static pairs, and
        (with `dynamic`) at most `max_signatures` dynamic ones, each serving many signatures."""
        unique = {id(pair): pair for pair in (*self._cache.dynamic.values(), *self._cache.pairs.values())}
        return tuple(unique.values())

    @property
    def shape_ranges(self) -> ShapeRanges | None:
        """With `dynamic`, the resolved ranges its pairs serve (None before the first call compiled one)."""
        return self._cache.ranges

    def recompile(self) -> None:
        """Drops every compiled pair: the next call traces and compiles again from the U-Net's current weights."""
        with self._cache.lock:
            self._refuse_if_released("recompile")
            self._cache.clear()

    def release_weights(self) -> int:
        """Frees the PyTorch copy of the U-Net's weights, so that the process holds one copy (the compiled
        graphs') instead of two; returns the bytes of the storages the U-Net and the pairs' graph modules let go
        (freed unless something else still holds them). The ONNX exporter leaves tensors that view the weights
        (transposed linear weights) in reference cycles: a collection frees them here (SD 1.5 with onnxruntime:
        without it, 2.47 of the 3.44 GB came back; with it, all). torch's record of the last trace, which holds the
        weights after AOTInductor's freezing, is cleared too.

        For backends whose compiled graphs hold their own weights: onnxruntime, tensorrt, and aoti on CPU (frozen
        graphs, its default there) or with `share_weights=False`; not eager, Inductor, or aoti with
        `share_weights=True`, whose graphs read the module's weights where they are (one copy without releasing
        anything). Compile every shape you serve
        first (`prepare`, or `dynamic=`): afterwards a new shape, `recompile()`, `export` and the weight-change
        check are refused, and the U-Net module itself is left without weights (do not run it).

        Example:
            >>> dc = compile_deepcache(unet, branch=1, interval=5, backend="onnxruntime")
            >>> dc.prepare(**call)
            >>> dc.release_weights()  # about the U-Net's size, e.g. 3.44e9 for SD 1.5 in fp32
        """
        with self._cache.lock:
            cache = self._cache
            pairs = list({id(p): p for p in (*cache.pairs.values(), *cache.dynamic.values())}.values())
            if not pairs:
                raise ValueError("nothing is compiled yet: prepare() every shape you serve (or compile with "
                                 "dynamic=...) before release_weights()")
            if not all(p.owns_weights for p in pairs):
                raise ValueError(f"the {self.deepcache_config.backend} graphs read the U-Net's weights at run time: "
                                 "release_weights() needs a backend whose graphs hold their own (onnxruntime, "
                                 "tensorrt, aoti unless backend_options={'share_weights': True})")
            modules = [self.unet, *(m for p in pairs for m in (p.traced.gm, p.split.full, p.split.shallow))]
            modules += [g for p in pairs if p.three
                        for g in (p.three.graphs.head, p.three.graphs.deep, p.three.graphs.tail)]
            modules += [p.device_step for p in pairs if p.device_step is not None]
            tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()}
            for t in tensors.values():
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            cache.released = True
        forget_last_trace()  # an export since compiling (dc.export) may have left one holding the weights
        gc.collect()  # views of the weights left in reference cycles (the ONNX exporter's) hold their storages
        return sum(storages.values())

    def _refuse_if_released(self, what: str) -> None:
        if self._cache.released:
            raise RuntimeError(f"cannot {what}: the U-Net's weights were released (release_weights()); compile "
                               "every shape before releasing, or build a new DeepCacheUNet from a U-Net with weights")

    def _check_weights(self) -> None:
        cache = self._cache
        if cache.fingerprint is None or cache.released:
            return
        structure, state = weights_fingerprint(self.unet)
        if (structure, state) == cache.fingerprint:
            return
        if structure == cache.fingerprint[0] and self.deepcache_config.backend == "eager":
            cache.fingerprint = (structure, state)  # eager graphs read the parameters they share: nothing to do
            return
        if self.deepcache_config.on_weight_change == "error":
            raise RuntimeError(
                f"the U-Net's weights changed since its {self.deepcache_config.backend} pairs were compiled (which "
                "keep the old ones): call dc.recompile(), or pass on_weight_change='recompile' to compile_deepcache")
        logger.warning("the U-Net's weights changed since its pairs were compiled: compiling them again")
        self.recompile()

    def export(self, directory, format: str = "pt2", **options):
        """Writes the pair as engine files plus `deepcache.json`; see `export.export_deepcache`.

        Example:
            >>> dc.export("engines/sd15-b1", format="onnx", example=call)
        """
        from ..artifacts.export import export_deepcache

        self._refuse_if_released("export")
        config = self.deepcache_config
        if config.graphs != "step" and (not config.policy.exportable or (config.forecast and config.policy.uses_probe)):
            raise ValueError(f"{type(config.policy).__name__}{' with forecast' if config.forecast else ''} runs in "
                             "Python only (engine files carry fixed schedules and calibrated plans, with or without "
                             "forecast, adaptive refresh without lagged=True or forecast, and any probe policy "
                             "compiled with split='step', which decides inside the step graph)")
        return export_deepcache(self, directory, format, **options)

    def with_schedule(self, policy: RefreshPolicy) -> "DeepCacheUNet":
        """A DeepCacheUNet with another schedule, calibrated plan or refresh policy that shares this one's
        compiled pairs (no recompilation). A policy that decides from the probe needs pairs compiled with the
        three-graph split.

        Example:
            >>> dc10 = dc.with_schedule(Schedule("uniform", interval=10))
            >>> planned = dc.with_schedule(dc.calibrate(lambda: pipe(prompt), full_steps=10))
        """
        config = self.deepcache_config
        if not isinstance(policy, RefreshPolicy):
            raise TypeError(f"with_schedule takes a Schedule, a CalibratedPlan or a refresh policy, not "
                            f"{type(policy).__name__}")
        if config.graphs == "step":
            raise ValueError("split='step' compiles its policy's rule into the step graph: compile_deepcache again "
                             "with the other policy (or use split='three', whose graphs any probe policy runs)")
        if policy.uses_probe and config.graphs != "three":
            raise ValueError("this policy decides from the head's probe, so it needs pairs compiled with the "
                             "three-graph split: compile with compile_deepcache(..., split='three') and call "
                             "with_schedule on that one")
        schedule = getattr(policy, "schedule", policy)  # a calibrated plan runs as its schedule
        changes = dict(schedule=schedule, refresh=None) if isinstance(schedule, Schedule) else dict(refresh=policy)
        other = DeepCacheUNet(self.unet, dataclasses.replace(config, **changes, split=config.graphs))
        other._cache = self._cache
        return other

    def calibrate(self, run: Callable[[], Any], full_steps: int | None = None,
                  speedup: float | None = None) -> CalibratedPlan:
        """Runs `run()` (one generation through this U-Net, e.g. `lambda: pipe(prompt, num_inference_steps=50)`)
        with every step full, records the cached feature per step, and returns the plan of `full_steps` full
        steps (or the most that reach a MAC `speedup`) with the least drift; see `refresh.CalibratedPlan`.

        Example:
            >>> plan = pipe.unet.calibrate(lambda: pipe(prompt, num_inference_steps=50), full_steps=10)
            >>> pipe.unet = pipe.unet.with_schedule(plan)
        """
        from .calibrate import calibrate

        return calibrate(self, run, full_steps, speedup)

    def prepare(self, *args, **kwargs) -> CompiledPair:
        """Traces and compiles the pair for this call's signature now (ahead of the first denoising step)."""
        return self.pair_for(self.flatten(args, kwargs))

    def pair_for(self, call: FlatCall) -> CompiledPair:
        """The compiled pair that runs this flattened call (`self.flatten(args, kwargs)`), compiling it on first
        sight (the `StepBatcher` runs its batched calls on it)."""
        pairs = self._cache.pairs
        pair = pairs.get(call.signature)
        if pair is not None:
            try:
                pairs.move_to_end(call.signature)
            except KeyError:  # evicted by another thread meanwhile: this call still runs it
                pass
            return pair
        with self._cache.lock:
            pair = pairs.get(call.signature)  # another thread may have compiled it meanwhile
            return pair if pair is not None else self._compile(call)

    def _compile(self, call: FlatCall) -> CompiledPair:
        if call.timestep is not None and timestep_mark(call.timestep) is None and not self._warned_no_mark:
            self._warned_no_mark = True
            logger.warning(
                "the timestep is a standalone device tensor: DeepCacheUNet cannot see a new generation start "
                "without a device sync; call reset() before each generation (pipelines that iterate over "
                "scheduler.timesteps do not need this)"
            )
        self._refuse_if_released(f"compile a pair for a new input signature {call.signature[1]}")
        cache, config = self._cache, self.deepcache_config
        if not cache.pairs and not cache.dynamic:
            cache.fingerprint = weights_fingerprint(self.unet)
        if config.dynamic is None:
            return cache.put(cache.pairs, call.signature, compile_pair(self.unet, call, config))
        if cache.ranges is None:
            cache.ranges = shape_ranges(self.unet, call, "dynamic", **config.dynamic)
        try:
            cache.ranges.check(tuple(call.tensors[0].shape), owner="the dynamic pair", fix=(
                "pass dynamic=dict({what}=({lo}, {hi})) to compile_deepcache, or outside_ranges='static' to "
                "compile a static pair for this shape"))
        except ValueError:
            if config.outside_ranges == "error":
                raise
            logger.info("shape %s is outside the dynamic ranges: compiling a static pair for it", call.tensors[0].shape)
            return cache.put(cache.pairs, call.signature, compile_pair(self.unet, call, config))
        key = shape_class(tuple(meta[0] for meta in call.signature[1])), call.signature[0], call.constants, tuple(
            meta[1:] for meta in call.signature[1])
        pair = cache.dynamic.get(key)
        if pair is None:
            pair = cache.put(cache.dynamic, key, compile_pair(self.unet, call, config, cache.ranges))
        else:
            cache.dynamic.move_to_end(key)
        return cache.put(cache.pairs, call.signature, pair)

