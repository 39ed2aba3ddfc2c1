"""Continuous step-level batching of DeepCache generations (as LLM servers batch tokens).

Requests arrive at any time and each keeps its own latents, scheduler, step counter, refresh policy (with its
per-generation controller, the same `policy.Controller` that `DeepCacheUNet` asks) and cached rows. Every
`tick()` asks each request's controller whether its next step is full, groups the requests by that decision
and by shape class (channels, height, width, conditioning shapes), packs each group into calls of at most
`max_batch` rows, and runs one batched call per pack on a dynamic pair: the full graph for requests due a full
step (each gets its new cache rows back), the shallow graph for the others (their cache rows concatenated).
Policies that decide from the head's probe (adaptive refresh) run head, then the deep graph on the rows whose
controller asks for a full step, then the tail on all. With forecast, shallow calls group the requests that are
as many steps past their last full step (the extrapolation's step count is one number per call).
Requests at different timesteps share a call: the timestep is passed per sample. A request that finishes, is
cancelled or fails frees its rows at once.

Batched arithmetic is not bitwise the per-request arithmetic (other matmul blockings): results agree with the
same generation run alone within rounding (tested to 1e-5 relative).

Example:
    >>> batcher = StepBatcher(compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 16))), scheduler)
    >>> request = batcher.submit(noise, steps=50, interval=5)
    >>> while batcher.active: batcher.tick()
    >>> latents = request.wait()
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..policy import Controller, RefreshPolicy, resolve_policy
from ..runtime.dispatch import DeepCacheUNet
from ..runtime.generation import Extrapolation, check_finite
from ..schedule import Schedule

logger = logging.getLogger(__name__)

__all__ = ["Request", "StepBatcher"]


@dataclass(eq=False)
class Request:
    """One generation in flight. `cache` holds its rows of the latest full step's cached feature."""

    id: int
    latents: torch.Tensor
    conditions: dict[str, torch.Tensor]
    scheduler: Any
    policy: RefreshPolicy
    steps: int
    step: int = 0
    cache: torch.Tensor | None = None
    controller: Controller | None = None
    full: bool | None = None  # the decision for the next step (None: decided after the head, from the probe)
    extrapolation: Extrapolation = field(default_factory=Extrapolation)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: list[Callable[["Request"], None]] = field(default_factory=list)
    _callback_lock = threading.Lock()  # a class attribute: finishing is rare, one lock serves all requests

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The final latents, once done (raises the request's error, or TimeoutError)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def add_done_callback(self, fn: Callable[["Request"], None]) -> None:
        """Calls `fn(request)` once it is done (at once if it is), from the thread that finished it."""
        with self._callback_lock:
            if not self.done.is_set():
                self.callbacks.append(fn)
                return
        fn(self)

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    def decide(self) -> None:
        """Asks the controller about the next step, where the policy decides before any graph runs."""
        if self.controller is None:
            self.controller = self.policy.controller(self.steps)
        self.full = None if self.policy.uses_probe else self.ask(None)

    def ask(self, probe: torch.Tensor | None) -> bool:
        """The controller's decision for the next step (full where nothing is cached yet), as `run_step` asks."""
        t = self.scheduler.timesteps[self.step]
        return self.controller.decide(self.step, probe, tuple(self.latents.shape[-2:]), t) or self.cache is None

    def group(self, forecast: bool) -> tuple:
        """Requests with equal groups share one batched call."""
        shapes = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(self.conditions.items()))
        since = self.step - self.extrapolation.step if forecast and self.full is False else None
        return self.full, since, tuple(self.latents.shape[1:]), self.latents.dtype, shapes


class StepBatcher:
    """Runs many DeepCache generations together, one batched U-Net call per step kind and shape per tick.

    `dc` must be compiled with `dynamic=` ranges whose batch covers the largest group (`max_batch` rows per
    call; larger groups are split). `scheduler` is copied per request (`from_config`), so requests with
    different step counts keep their own timesteps. Thread-safe: `submit`, `cancel` and `Request.wait` may be
    called from any thread while one thread runs `tick()` (or `run_forever`).
    """

    def __init__(self, dc: DeepCacheUNet, scheduler, max_batch: int | None = None):
        if dc.deepcache_config.dynamic is None:
            raise ValueError("StepBatcher needs a pair that serves varying batches: compile with "
                             "compile_deepcache(..., dynamic=dict(batch=(1, N))) (N = the largest batch per call)")
        config = dc.deepcache_config
        if config.forecast and config.policy.uses_probe:
            raise ValueError("the StepBatcher runs forecast with policies that decide from the step, not from the "
                             "probe: use a schedule or a calibrated plan with forecast=True, or forecast=False")
        self.dc = dc
        self.scheduler = scheduler
        self.max_batch = max_batch or dc.deepcache_config.dynamic.get("batch", (1, 16))[1]
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.calls = 0  # batched U-Net calls so far
        self.rows = 0  # request rows they carried (rows / calls = the mean batch)

    def submit(self, latents: torch.Tensor, steps: int, interval: int | None = None,
               schedule: RefreshPolicy | str | None = None, **conditions: torch.Tensor) -> Request:
        """Adds a generation of `steps` steps starting from `latents` (batch first); returns its `Request`.

        Its policy is `schedule` (a `Schedule`, a `CalibratedPlan`, or another refresh policy or its registered
        name), or uniform 1:`interval`, or the DeepCacheUNet's own. Bad input (no steps, NaN, more rows than
        `max_batch`, a size outside the pair's ranges, a probe policy on pairs without the three-graph split)
        raises here, before the request joins any batch."""
        if steps < 1:
            raise ValueError(f"steps={steps}: a generation has at least 1 step")
        if latents.shape[0] > self.max_batch:
            raise ValueError(f"this request has {latents.shape[0]} rows, more than the {self.max_batch} one batched "
                             f"call takes (max_batch): split it into requests of at most {self.max_batch} rows")
        check_finite((latents, *conditions.values()), ("latents", *conditions))
        for name, value in conditions.items():
            if value.shape[0] != latents.shape[0]:
                raise ValueError(f"condition {name!r} has batch {value.shape[0]}, the latents {latents.shape[0]}: "
                                 "give every condition one row per latent")
        if self.dc.shape_ranges is None:  # the first request compiles the pair (once), here rather than in a tick
            self.dc.prepare(**{self.dc.flatten.parameters[0]: latents}, timestep=torch.zeros(latents.shape[0], dtype=torch.long), **conditions)
        self.dc.shape_ranges.check(tuple(latents.shape), owner="this server's pair",
                                   fix="this server accepts {what} in the pair's ranges only")
        policy = resolve_policy(schedule) if schedule is not None else (
            Schedule("uniform", interval=interval) if interval else self.dc.deepcache_config.policy)
        if policy.uses_probe and self.dc.deepcache_config.graphs != "three":
            raise ValueError("this policy decides from the head's probe: compile the server's pair with "
                             "split='three' (or refresh='adaptive')")
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        with self._lock:
            request = Request(next(self._ids), latents, conditions, scheduler, policy, steps)
            self._requests[request.id] = request
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """Drops a request and its cache rows (a client that went away); its `wait` raises."""
        if not request.done.is_set():
            self._finish(request, error=RuntimeError(f"request {request.id} was cancelled"))

    @property
    def active(self) -> int:
        return len(self._requests)

    def tick(self) -> int:
        """Runs one step of every active request, batched; returns how many requests stepped."""
        with self._lock:
            requests = [r for r in self._requests.values() if not r.done.is_set()]
        groups: dict[tuple, list[Request]] = {}
        forecast = self.dc.deepcache_config.forecast
        for request in requests:
            try:
                request.decide()
            except Exception as err:  # a calibrated plan that does not fit this request, a policy's own error
                self._finish(request, error=err)
                continue
            groups.setdefault(request.group(forecast), []).append(request)
        for key, members in groups.items():
            for pack in _packs(members, self.max_batch):
                self._step(pack, full=key[0])
        return len(requests)

    def run_forever(self, stop: threading.Event) -> None:
        """Ticks while there is work, sleeps until a request arrives, returns when `stop` is set."""
        while not stop.is_set():
            if not self.active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.tick()

    def _step(self, members: list[Request], full: bool | None) -> None:
        """One step of `members`. A failing batched call is run again request by request, so that only the
        request that fails (its input, its scheduler) fails; no state moves before a call succeeds."""
        try:
            outs, caches = self._run_unet(members, full)
        except Exception as err:
            if len(members) > 1:
                logger.warning("a batched %s step of %d requests failed (%s): running them one by one",
                               {True: "full", False: "shallow", None: "adaptive"}[full], len(members), err)
                for request in members:
                    self._step([request], full)
                return
            logger.exception("request %d failed", members[0].id)
            self._finish(members[0], error=err)
            return
        for request, out, (cache, was_full) in zip(members, outs, caches):
            if request.done.is_set():  # cancelled meanwhile
                continue
            try:
                t = request.scheduler.timesteps[request.step]
                request.latents = request.scheduler.step(out, t, request.latents).prev_sample
            except Exception as err:
                logger.exception("request %d failed in its scheduler", request.id)
                self._finish(request, error=err)
                continue
            if was_full and self.dc.deepcache_config.forecast:
                request.extrapolation.full(cache, request.step)
            request.cache = cache
            request.step += 1
            if request.step == request.steps:
                self._finish(request, result=request.latents)

    def _run_unet(self, members: list[Request], full: bool | None) -> tuple[tuple[torch.Tensor, ...], list]:
        """One batched call for `members`: their outputs and, per request, `(cache rows, whether full)`."""
        rows = [r.rows for r in members]
        timesteps = torch.cat([r.scheduler.timesteps[r.step].reshape(1).expand(n) for r, n in zip(members, rows)])
        call = {self.dc.flatten.parameters[0]: torch.cat([r.latents for r in members]), "timestep": timesteps}
        for name in members[0].conditions:
            call[name] = torch.cat([r.conditions[name] for r in members])
        flat = self.dc.flatten((), call)
        pair, tensors = self.dc.pair_for(flat), flat.tensors
        with torch.no_grad():
            if full is None:
                sample, caches = self._run_three(pair.three, tensors, members, rows)
            elif full:
                sample, cache = pair.full(*tensors)
                caches = [(c, True) for c in torch.split(cache, rows)]
            else:
                extra = self._forecast_inputs(members) if pair.forecast else ()
                (sample,) = pair.shallow(*tensors, torch.cat([r.cache for r in members]), *extra)
                caches = [(r.cache, False) for r in members]
        self.calls += 1
        self.rows += sum(rows)
        return torch.split(sample, rows), caches

    def _run_three(self, three, tensors: tuple, members: list[Request], rows: list[int]):
        """Head on all rows; each controller decides from its rows of the probe; where any row group is due a full
        step, deep on all rows (the head's links carry the batch size, so the deep graph runs the call's rows)
        and the fresh cache rows go to the groups due one; tail on all rows with their caches."""
        links = three.head(*tensors)
        probes = torch.split(links[three.probe], rows)
        decisions = [r.ask(p) for r, p in zip(members, probes)]
        fresh = torch.split(three.deep(*tensors, *links)[0], rows) if any(decisions) else [None] * len(rows)
        caches = [(new, True) if d else (r.cache, False) for r, d, new in zip(members, decisions, fresh)]
        (sample,) = three.tail(*tensors, *links, torch.cat([c for c, _ in caches]))
        return sample, caches

    def _forecast_inputs(self, members: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The extrapolation inputs of a shallow call: every member is as many steps past its last full step."""
        slopes, steps = zip(*(r.extrapolation.inputs(r.step) for r in members))
        return torch.cat(slopes), steps[0]

    def _finish(self, request: Request, result: torch.Tensor | None = None, error: BaseException | None = None):
        with self._lock:
            if request.done.is_set():
                return
            self._requests.pop(request.id, None)
            request.result, request.error, request.cache = result, error, None
            with Request._callback_lock:
                request.done.set()
                callbacks, request.callbacks = request.callbacks, []
        for fn in callbacks:
            try:
                fn(request)
            except Exception:  # a waiter's bug must not stop the batcher
                logger.exception("a done-callback of request %d failed", request.id)


def _packs(members: list[Request], max_batch: int) -> list[list[Request]]:
    """Consecutive packs of at most `max_batch` rows (every request has at most `max_batch`)."""
    packs, rows = [[]], 0
    for request in members:
        if rows + request.rows > max_batch:
            packs.append([])
            rows = 0
        packs[-1].append(request)
        rows += request.rows
    return [p for p in packs if p]
