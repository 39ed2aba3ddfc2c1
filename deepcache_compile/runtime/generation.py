"""Per-generation state and one dispatched step: the part of the runtime that compiled pairs and loaded
engines share (it imports no graph pass and no compiler).

A generation is counted in U-Net calls. A new one starts on `reset()`, when the input signature changes, or
when the timestep goes up; the timestep is read only where that costs no device sync (a Python number or a
CPU tensor), and otherwise from its position in the scheduler's timestep tensor (diffusers pipelines iterate
over `scheduler.timesteps`, so each `t` is a view into it: a new storage or a lower offset means a new schedule).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..calls import FlatCall
from ..policy import Controller, RefreshPolicy
from ..tracing import GATE

logger = logging.getLogger(__name__)

__all__ = ["DECIDE", "FORCE_FULL", "FORCE_CACHED", "step_mode", "Extrapolation", "GenerationState", "GenerationStates", "StepGraphs", "check_finite", "run_step", "timestep_mark"]


@dataclass(frozen=True)
class StepGraphs:
    """What `run_step` runs: the full and shallow graphs (`(*inputs) -> (sample, cache)`,
    `(*inputs, cache[, slope, steps]) -> (sample,)`), and, for policies that decide from the head's probe, the
    head/deep/tail graphs (`three`, with its `probe` index) or the compiled step that decides on the device
    (`step`, with `step_state`, the `policy.StepState` it carries: `graph.step`). `CompiledPair` has the same
    attributes."""

    full: Callable
    shallow: Callable
    three: Any = None
    forecast: bool = False
    step: Callable | None = None
    step_state: Any = None


class Extrapolation:
    """One slot's forecast inputs: the slope of the cached feature between its last two full steps."""

    def __init__(self):
        self.cache: torch.Tensor | None = None
        self.step = 0
        self.slope: torch.Tensor | None = None

    def full(self, cache: torch.Tensor, step: int) -> None:
        if self.cache is None:
            self.slope = torch.zeros_like(cache)  # one full step so far: plain reuse
        else:
            self.slope = torch.sub(cache, self.cache).div_(step - self.step)
        self.cache, self.step = cache, step

    def inputs(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(slope, steps since the last full step)` for a shallow step."""
        return self.slope, torch.full((), float(step - self.step), dtype=self.slope.dtype, device=self.slope.device)


class GenerationState:
    """The call counter, one cache per call slot, and what ran. `reset()` starts a new generation.

    Attributes:
        calls_per_step: U-Net calls per denoising step (2 for separate CFG calls), each slot with its own cache.
        calls: U-Net calls so far in this generation.
        caches: the latest full step's cached tensor per slot (None before the first full step).
        history: one letter per call of this generation, "F" (full) or "S" (shallow).
        step: the index of the next step (calls // calls_per_step).
        recording: while calibrating, every step runs full and appends `(step, slot, timestep, size, cache)`
            here (survives `reset`).
    """

    def __init__(self, calls_per_step: int):
        self.calls_per_step = calls_per_step
        self.signature: Any = None
        self.recording: list | None = None
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.caches: list[torch.Tensor | None] = [None] * self.calls_per_step
        self.controllers: list[Controller | None] = [None] * self.calls_per_step
        self.extrapolations: list[Extrapolation | None] = [None] * self.calls_per_step
        self.device_states: list[tuple | None] = [None] * self.calls_per_step  # split="step": the policy's tensors
        self._history = ""
        self._decided: list[torch.Tensor] = []  # split="step": what each step did, read when asked
        self.mark: tuple | None = None

    @property
    def history(self) -> str:
        """One letter per call, "F" or "S". Steps decided on the device are read here, when asked (a sync)."""
        if self._decided:
            self._history += "".join("F" if bool(full) else "S" for full in self._decided)
            self._decided.clear()
        return self._history

    def controller(self, slot: int, policy: RefreshPolicy) -> Controller:
        controller = self.controllers[slot]
        if controller is None:
            controller = self.controllers[slot] = policy.controller()
        return controller

    def extrapolation(self, slot: int) -> Extrapolation:
        extrapolation = self.extrapolations[slot]
        if extrapolation is None:
            extrapolation = self.extrapolations[slot] = Extrapolation()
        return extrapolation

    @property
    def step(self) -> int:
        return self.calls // self.calls_per_step

    def starts_generation(self, signature: Any, mark: tuple | None) -> bool:
        """Whether a call with this signature and `timestep_mark` would be the first of a generation (reads only)."""
        return self.calls == 0 or signature != self.signature or _starts_new_generation(self.mark, mark)

    def begin(self, signature: Any, mark: tuple | None) -> tuple[int, int]:
        """Registers a call (its signature and `timestep_mark`); returns `(step, slot)`, resetting first if the
        call starts a new generation."""
        if signature != self.signature:
            if self.signature is not None:
                logger.debug("input signature changed: new generation")
            self.signature = signature
            self.reset()
        elif _starts_new_generation(self.mark, mark):
            self.reset()
        self.mark = mark
        return divmod(self.calls, self.calls_per_step)

    def end(self, slot: int, cache: torch.Tensor | None, forecast: bool = False) -> None:
        """Records a finished call: a full step passes its new cache, a shallow step None; with `forecast` a new
        cache also updates the slot's extrapolation."""
        if cache is not None:
            self.caches[slot] = cache
            if forecast:
                self.extrapolation(slot).full(cache, self.calls // self.calls_per_step)
        self.history  # noqa: B018 (letters of device-decided steps before this one first, in call order)
        self._history += "S" if cache is None else "F"
        self.calls += 1

    def end_on_device(self, slot: int, device_state: tuple, full: torch.Tensor) -> None:
        """Records a step decided on the device: its new policy tensors and its (unread) decision."""
        self.device_states[slot] = device_state
        self._decided.append(full)  # read only when the history is asked for: no host read per step
        self.calls += 1


class GenerationStates:
    """Which `GenerationState` a call uses: one per thread by default, or one per `generation()` block.

    Concurrent generations that share one compiled pair (threads of a web server, asyncio tasks) never see each
    other's counter or cache. Threads are isolated without doing anything; within one thread (asyncio tasks,
    interleaved generations) each `with states.generation():` block gets a fresh state of its own, carried by a
    context variable, so each task that enters one is isolated too. Cost per call: a context-variable read.
    `new` makes a fresh state (default: a `GenerationState`; the native engine's are C++ generation handles).
    """

    def __init__(self, calls_per_step: int, new: Callable[[], Any] | None = None):
        self.calls_per_step = calls_per_step
        self._new = new or (lambda: GenerationState(calls_per_step))
        self._scoped: contextvars.ContextVar[Any] = contextvars.ContextVar(
            f"deepcache_generation_{id(self)}", default=None)
        self._per_thread = threading.local()

    def current(self) -> GenerationState:
        state = self._scoped.get()
        if state is not None:
            return state
        state = getattr(self._per_thread, "state", None)
        if state is None:
            state = self._per_thread.state = self._new()
        return state

    @contextlib.contextmanager
    def generation(self) -> Iterator[GenerationState]:
        """A fresh generation for the calls inside the block (then the previous state is current again)."""
        state = self._new()
        token = self._scoped.set(state)
        try:
            yield state
        finally:
            self._scoped.reset(token)


def run_step(state: GenerationState, policy: RefreshPolicy, call: FlatCall, graphs, mark: tuple | None = None
             ) -> torch.Tensor:
    """Runs one model call: the slot's controller decides full or cached (after the head graph, from its probe,
    for policies with `uses_probe`), and the slot's cache is kept. `graphs`: a `StepGraphs` or `CompiledPair`.

    `mark` is the call's `timestep_mark` where the caller has it already. While calibrating (`state.recording`)
    every step is full. The state advances only after the graphs returned, so an exception leaves it consistent.
    """
    step, slot = state.begin(call.signature, timestep_mark(call.timestep) if mark is None else mark)
    controller, cache, recording = state.controller(slot, policy), state.caches[slot], state.recording is not None
    inputs, size = call.tensors, tuple(call.tensors[0].shape[-2:])
    with torch.no_grad(), GATE.step():
        if graphs.step is not None and not recording:
            device_state = state.device_states[slot] or graphs.step_state.initial(inputs[0].shape[0], inputs[0].device)
            sample, *device_state, full = graphs.step(*inputs, *device_state, step_mode(DECIDE, inputs[0].device))
            state.end_on_device(slot, tuple(device_state), full)
            return sample
        if policy.uses_probe and not recording:
            three = graphs.three
            links = three.head(*inputs)
            full = controller.decide(step, links[three.probe], size, call.timestep) or cache is None
            if full:
                (cache,) = three.deep(*inputs, *links)
            (sample,) = three.tail(*inputs, *links, cache, *_forecast_inputs(state, slot, step, cache, graphs, full))
        else:
            full = recording or controller.decide(step, None, size, call.timestep) or cache is None
            if full:
                sample, cache = graphs.full(*inputs)
            else:
                (sample,) = graphs.shallow(*inputs, cache, *_forecast_inputs(state, slot, step, cache, graphs, False))
    if recording:
        state.recording.append((step, slot, call.timestep, size, cache.detach().clone()))
    state.end(slot, cache if full else None, graphs.forecast)
    return sample


DECIDE, FORCE_FULL, FORCE_CACHED = 0, 1, 2  # the step graph's `mode` input (graph/step.py)
_MODES: dict[tuple[int, torch.device], torch.Tensor] = {}


def step_mode(mode: int, device: torch.device) -> torch.Tensor:
    """The step graph's `mode` input as a tensor, made once per mode and device."""
    tensor = _MODES.get((mode, device))
    if tensor is None:
        tensor = _MODES[mode, device] = torch.full((), mode, dtype=torch.int64, device=device)
    return tensor


def _forecast_inputs(state: GenerationState, slot: int, step: int, cache: torch.Tensor, graphs, full: bool) -> tuple:
    if not graphs.forecast:
        return ()
    return keep_cache(cache) if full else state.extrapolation(slot).inputs(step)


def keep_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forecast inputs `(slope, steps)` that reuse `cache` unchanged: zeros, and 0 steps. (Never `cache`
    itself as the slope: tracers merge an input passed twice into one.)"""
    return torch.zeros_like(cache), torch.zeros((), dtype=cache.dtype, device=cache.device)


def check_finite(tensors: tuple[torch.Tensor, ...], names: tuple[str, ...]) -> None:
    """Raises ValueError naming the input if a floating-point input holds NaN or inf. Called at the first call
    of each generation (one device sync per generation, none per step): a broken generation fails alone, before
    it touches any state, instead of returning NaN images."""
    for name, t in zip(names, tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"input {name!r} of this generation's first call contains NaN or inf: check the "
                             "latents and conditionings (a NaN-producing VAE encode, a division by a zero noise "
                             "level, fp16 overflow in a text encoder)")


def timestep_mark(t: Any) -> tuple | None:
    """What tells generations apart without a device sync: the value if on the host, else the view position."""
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
