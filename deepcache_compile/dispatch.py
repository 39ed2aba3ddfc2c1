"""DeepCacheUNet: the drop-in replacement for `pipe.unet` that alternates the full and shallow graphs.

Plain Python outside every compiled region. Per call it flattens the inputs, looks up the compiled pair of
their signature (tracing it on first sight), decides FULL or SHALLOW from an integer call counter and the
schedule, and runs one graph. It never reads a tensor on an accelerator: a new generation is detected from
the timestep's value only where that value is already on the host (a Python number or a CPU tensor), and
otherwise from the timestep's position in the scheduler's timestep tensor (diffusers pipelines iterate over
`scheduler.timesteps`, so each `t` is a view into it: a new storage or a lower offset means a new schedule).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .config import DeepCacheConfig
from .pair import CompiledPair, compile_pair
from .schedule import Schedule
from .trace import CallFlattener, FlatCall

logger = logging.getLogger(__name__)

__all__ = ["DeepCacheUNet", "GenerationState", "run_step"]


class GenerationState:
    """Per-generation state: the call counter and one cache per call slot. `reset()` starts a new generation."""

    def __init__(self, calls_per_step: int):
        self.calls_per_step = calls_per_step
        self.signature: Any = None
        self.mark: tuple | None = None
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.caches: list[torch.Tensor | None] = [None] * self.calls_per_step
        self.mark = None

    def begin(self, signature: Any, timestep: Any) -> tuple[int, int]:
        """Registers a call; returns `(step, slot)`, resetting first if the call starts a new generation."""
        mark = _timestep_mark(timestep)
        if signature != self.signature:
            if self.signature is not None:
                logger.debug("input signature changed: new generation")
            self.signature = signature
            self.reset()
        elif _starts_new_generation(self.mark, mark):
            self.reset()
        self.mark = mark
        return divmod(self.calls, self.calls_per_step)

    def end(self, slot: int, cache: torch.Tensor | None) -> None:
        if cache is not None:
            self.caches[slot] = cache
        self.calls += 1


def run_step(state: GenerationState, schedule: Schedule, call: FlatCall, full, shallow) -> torch.Tensor:
    """Runs one U-Net call: full or shallow by the schedule, keeping the cache of the call's slot."""
    step, slot = state.begin(call.signature, call.timestep)
    cache = state.caches[slot]
    with torch.no_grad():
        if cache is None or schedule.is_full(step):
            sample, cache = full(*call.tensors)
        else:
            (sample,), cache = shallow(*call.tensors, cache), None
    state.end(slot, cache)
    return sample


def _timestep_mark(t: Any) -> tuple | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return ("value", float(t))
    if t.device.type == "cpu":
        return ("value", float(t.reshape(-1)[0]))  # host memory: no device sync
    storage = t.untyped_storage()
    if storage.nbytes() <= t.numel() * t.element_size():
        return None  # a standalone device tensor: its value is unknown without a sync
    return ("view", storage.data_ptr(), t.storage_offset())


def _starts_new_generation(prev: tuple | None, cur: tuple | None) -> bool:
    if prev is None or cur is None:
        return False
    if prev[0] != cur[0]:
        return True
    if cur[0] == "value":
        return cur[1] > prev[1]  # the timestep went up
    return cur[1] != prev[1] or cur[2] < prev[2]


def _output_type(unet: nn.Module) -> type | None:
    annotation = inspect.signature(unet.forward).return_annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and "sample" in getattr(candidate, "__dataclass_fields__", {}):
            return candidate
    return None


class DeepCacheUNet(nn.Module):
    """A U-Net that runs DeepCache: full steps on the schedule, shallow steps reusing the cached feature.

    Same forward signature and return type as the wrapped U-Net; other attributes (`config`, `dtype`,
    `device`, `add_embedding`, ...) are read from it, so it stands in for `pipe.unet`. The wrapped U-Net is
    not modified; it is a submodule, so `.to()` and offloading hooks move the weights the graphs use.

    Example:
        >>> dc = DeepCacheUNet(unet, DeepCacheConfig(branch=1))
        >>> out = dc(latents, t, encoder_hidden_states=text).sample
    """

    def __init__(self, unet: nn.Module, config: DeepCacheConfig):
        super().__init__()
        self.unet = unet
        self.deepcache_config = config
        self._flatten = CallFlattener(unet)
        self._output_type = _output_type(unet)
        self._pairs: OrderedDict[Any, CompiledPair] = OrderedDict()
        self._state = GenerationState(config.calls_per_step)
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
        call = self._flatten(args, kwargs)
        pair = self._pair(call, args, kwargs)
        sample = run_step(self._state, self.deepcache_config.schedule, call, pair.full, pair.shallow)
        if call.return_dict and self._output_type is not None:
            return self._output_type(sample=sample)
        return (sample,)

    def reset(self) -> None:
        """Forgets the cache and the step count: the next call is step 0 of a new generation (a full step)."""
        self._state.reset()

    def full_steps(self, total: int | None = None) -> list[int]:
        """The full-step indices (per call slot) of a generation of `total` steps."""
        return self.deepcache_config.schedule.full_steps(total)

    @property
    def step(self) -> int:
        """Index of the next step within the current generation."""
        return self._state.calls // self._state.calls_per_step

    def export(self, directory, format: str = "pt2", **options):
        """Writes the pair as engine files plus `deepcache.json`; see `export.export_deepcache`.

        Example:
            >>> dc.export("engines/sd15-b1", format="onnx", example=call)
        """
        from .export import export_deepcache

        return export_deepcache(self, directory, format, **options)

    def with_schedule(self, schedule: Schedule) -> "DeepCacheUNet":
        """A DeepCacheUNet with another schedule that shares this one's compiled pairs (no recompilation).

        Example:
            >>> dc10 = dc.with_schedule(Schedule("uniform", interval=10))
        """
        other = DeepCacheUNet(self.unet, dataclasses.replace(self.deepcache_config, schedule=schedule))
        other._pairs = self._pairs
        return other

    def prepare(self, *args, **kwargs) -> CompiledPair:
        """Traces and compiles the pair for this call's signature now (ahead of the first denoising step)."""
        return self._pair(self._flatten(args, kwargs), args, kwargs)

    def _pair(self, call: FlatCall, args: tuple, kwargs: dict) -> CompiledPair:
        pair = self._pairs.get(call.signature)
        if pair is not None:
            self._pairs.move_to_end(call.signature)
            return pair
        if call.timestep is not None and _timestep_mark(call.timestep) is None and not self._warned_no_mark:
            self._warned_no_mark = True
            logger.warning(
                "the timestep is a standalone device tensor: DeepCacheUNet cannot see a new generation start "
                "without a device sync; call reset() before each generation (pipelines that iterate over "
                "scheduler.timesteps do not need this)"
            )
        pair = compile_pair(self.unet, call, self._flatten.input_names(args, kwargs), self.deepcache_config)
        self._pairs[call.signature] = pair
        if len(self._pairs) > self.deepcache_config.max_signatures:
            self._pairs.popitem(last=False)
        return pair
