"""Continuous step-level batching of DeepCache generations (as LLM servers batch tokens).

Requests arrive at any time and each keeps its own latents, scheduler, step counter, schedule and cached
feature rows. Every `tick()` groups the active requests by the kind of their next step (full or shallow) and
by shape class (channels, height, width, conditioning shapes), and runs one batched call per group on a
dynamic pair: the full graph for requests due a full step (each gets its new cache rows back), the shallow
graph for the others (their cache rows concatenated). Requests at different timesteps share a call: the
timestep is passed per sample. A request that finishes, is cancelled or fails frees its rows at once.

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

from ..runtime.dispatch import DeepCacheUNet
from ..runtime.generation import check_finite
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
    schedule: Schedule
    steps: int
    step: int = 0
    cache: torch.Tensor | None = None
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
    def next_is_full(self) -> bool:
        return self.cache is None or self.schedule.is_full(self.step, self.steps)

    def group(self) -> tuple:
        """Requests with equal groups share one batched call."""
        shapes = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(self.conditions.items()))
        return self.next_is_full, tuple(self.latents.shape[1:]), self.latents.dtype, shapes


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
        self.dc = dc
        self.scheduler = scheduler
        self.max_batch = max_batch or dc.deepcache_config.dynamic.get("batch", (1, 16))[1]
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.calls = 0  # batched U-Net calls so far
        self.rows = 0  # request rows they carried (rows / calls = the mean batch)

    def submit(self, latents: torch.Tensor, steps: int, interval: int | None = None, schedule: Schedule | None = None,
               **conditions: torch.Tensor) -> Request:
        """Adds a generation of `steps` steps starting from `latents` (batch first); returns its `Request`.

        The schedule is `schedule`, or uniform 1:`interval`, or the DeepCacheUNet's own. Bad input (no steps,
        NaN, a size outside the pair's ranges) raises here, before the request joins any batch."""
        if steps < 1:
            raise ValueError(f"steps={steps}: a generation has at least 1 step")
        check_finite((latents, *conditions.values()), ("latents", *conditions))
        for name, value in conditions.items():
            if value.shape[0] != latents.shape[0]:
                raise ValueError(f"condition {name!r} has batch {value.shape[0]}, the latents {latents.shape[0]}: "
                                 "give every condition one row per latent")
        if self.dc.shape_ranges is None:  # the first request compiles the pair (once), here rather than in a tick
            self.dc.prepare(sample=latents, timestep=torch.zeros(latents.shape[0], dtype=torch.long), **conditions)
        self.dc.shape_ranges.check(tuple(latents.shape), owner="this server's pair",
                                   fix="this server accepts {what} in the pair's ranges only")
        if schedule is None:
            schedule = Schedule("uniform", interval=interval) if interval else self.dc.deepcache_config.schedule
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        with self._lock:
            request = Request(next(self._ids), latents, conditions, scheduler, schedule, steps)
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
        for request in requests:
            groups.setdefault(request.group(), []).append(request)
        for key, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                self._step(members[start:start + self.max_batch], full=key[0])
        return len(requests)

    def run_forever(self, stop: threading.Event) -> None:
        """Ticks while there is work, sleeps until a request arrives, returns when `stop` is set."""
        while not stop.is_set():
            if not self.active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.tick()

    def _step(self, members: list[Request], full: bool) -> None:
        """One step of `members`. A failing batched call is run again request by request, so that only the
        request that fails (its input, its scheduler) fails; no state moves before a call succeeds."""
        try:
            outs, caches = self._run_unet(members, full)
        except Exception as err:
            if len(members) > 1:
                logger.warning("a batched %s step of %d requests failed (%s): running them one by one",
                               "full" if full else "shallow", len(members), err)
                for request in members:
                    self._step([request], full)
                return
            logger.exception("request %d failed", members[0].id)
            self._finish(members[0], error=err)
            return
        for request, out, cache in zip(members, outs, caches):
            if request.done.is_set():  # cancelled meanwhile
                continue
            try:
                t = request.scheduler.timesteps[request.step]
                request.latents = request.scheduler.step(out, t, request.latents).prev_sample
            except Exception as err:
                logger.exception("request %d failed in its scheduler", request.id)
                self._finish(request, error=err)
                continue
            request.cache = cache
            request.step += 1
            if request.step == request.steps:
                self._finish(request, result=request.latents)

    def _run_unet(self, members: list[Request], full: bool) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """One batched U-Net call for `members`: their outputs and their cache rows (new ones on a full step)."""
        rows = [r.latents.shape[0] for r in members]
        timesteps = torch.cat([r.scheduler.timesteps[r.step].reshape(1).expand(n) for r, n in zip(members, rows)])
        call = {"sample": torch.cat([r.latents for r in members]), "timestep": timesteps}
        for name in members[0].conditions:
            call[name] = torch.cat([r.conditions[name] for r in members])
        flat = self.dc.flatten((), call)
        pair, tensors = self.dc._pair(flat), flat.tensors
        with torch.no_grad():
            if full:
                sample, cache = pair.full(*tensors)
                caches = list(torch.split(cache, rows))
            else:
                (sample,) = pair.shallow(*tensors, torch.cat([r.cache for r in members]))
                caches = [r.cache for r in members]
        self.calls += 1
        self.rows += sum(rows)
        return torch.split(sample, rows), caches

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
