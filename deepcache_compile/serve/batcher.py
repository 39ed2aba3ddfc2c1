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

Requests come in two kinds. `submit` hands the batcher the initial latents and it runs the scheduler itself.
`join` makes a request that is driven from outside: a diffusers pipeline running in its own thread calls
`call(request, sample, timestep, **conditions)` once per denoising step (through `serve.text2image`'s
`BatchedDenoiser`, which stands in for `pipe.unet`), the call waits for the tick that runs it, and the pipeline
does its own guidance and scheduler step. A tick runs when every joined request that has started denoising is
waiting (a first call waits `join_s` for others starting with it; no call waits more than `gather_s`), so the
pipelines in flight step together.

Batched arithmetic is not bitwise the per-request arithmetic (other matmul blockings): results agree with the
same generation run alone within rounding (tested to 1e-5 relative).

Example:
    >>> batcher = StepBatcher(compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 16))), scheduler)
    >>> request = batcher.submit(noise, steps=50, interval=5)
    >>> while batcher.active: batcher.tick()
    >>> latents = request.wait()
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

from ..artifacts.engine import DeepCacheEngine, EngineOutput
from ..policy import Controller, RefreshPolicy, resolve_policy
from ..runtime.dispatch import DeepCacheUNet
from ..runtime.generation import Extrapolation, check_finite
from ..schedule import Schedule

logger = logging.getLogger(__name__)

__all__ = ["Request", "Served", "StepBatcher"]


@dataclass(frozen=True)
class Served:
    """What the batcher runs, from a `DeepCacheUNet` (compiled here) or a `DeepCacheEngine` (loaded engine files).

    Attributes:
        model: the DeepCacheUNet or engine.
        signature: the denoiser's forward signature (`BatchedDenoiser` binds pipeline calls to it).
        policy: its default refresh policy; `forecast`, `three`: whether its graphs extrapolate the cache, and
            whether it has head/deep/tail graphs (policies that decide from the probe need them).
        output_type: what the denoiser returns with `return_dict=True`.
    """

    model: Any
    signature: inspect.Signature
    policy: RefreshPolicy
    forecast: bool
    three: bool
    output_type: type | None

    @classmethod
    def of(cls, dc: DeepCacheUNet | DeepCacheEngine) -> "Served":
        if isinstance(dc, DeepCacheEngine):
            if (dc.manifest.get("policy") or {}).get("decided") == "device":
                raise ValueError("this engine decides each step on the device (one step program per call): the "
                                 "batcher runs engines that decide on the host; export with split='three' or a "
                                 "schedule")
            if dc.ranges.batch[0] == dc.ranges.batch[1]:
                raise ValueError(f"this engine serves batch {dc.ranges.batch[0]} only: export it with batch=(1, N) "
                                 "for the batcher")
            if any(i["name"] == "timestep" and i["rank"] == 0 for i in dc.manifest["inputs"]):
                raise ValueError("this engine takes one timestep per call (exported from a 0-d timestep): the batcher "
                                 "runs rows at different steps; export it from a call with one timestep per row")
            params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                      for name in dc.manifest["unet"]["forward_params"]]
            return cls(dc, inspect.Signature(params), dc.schedule, dc._graphs.forecast, dc._graphs.three is not None,
                       EngineOutput)
        config = dc.deepcache_config
        if config.dynamic is None:
            raise ValueError("StepBatcher needs a pair that serves varying batches: compile with "
                             "compile_deepcache(..., dynamic=dict(batch=(1, N))) (N = the largest batch per call)")
        return cls(dc, dc.flatten.forward_signature, config.policy, config.forecast, config.graphs == "three",
                   dc._output_type)

    @property
    def sample(self) -> str:
        """The sample argument's name (`sample`, `hidden_states`)."""
        return next(iter(self.signature.parameters))

    @property
    def ranges(self):
        return self.model.shape_ranges

    def graphs(self, call: dict[str, Any]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """The graphs that run a batched call and its flat tensors."""
        if isinstance(self.model, DeepCacheEngine):
            return self.model._graphs, self.model._flatten(call)
        flat = self.model.flatten((), call)
        return self.model.pair_for(flat), flat.tensors


@dataclass(eq=False)
class Request:
    """One generation in flight. `cache` holds its rows of the latest full step's cached feature."""

    id: int
    latents: torch.Tensor
    conditions: dict[str, Any]
    scheduler: Any  # None: the request is driven from outside (`StepBatcher.join`)
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
    timestep: torch.Tensor | None = None  # driven: this step's timestep, one per row
    waiting_since: float | None = None  # driven: when this step's call arrived (None: no call waiting)
    answer: torch.Tensor | None = None  # driven: the model output of the step just run
    answered: threading.Event = field(default_factory=threading.Event)
    shared: dict = field(default_factory=dict)  # driven: value keys of conditions without a batch dimension
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
        t = self.scheduler.timesteps[self.step] if self.scheduler is not None else self.timestep[0]
        return self.controller.decide(self.step, probe, tuple(self.latents.shape[-2:]), t) or self.cache is None

    @property
    def driven(self) -> bool:
        return self.scheduler is None

    def timesteps(self) -> torch.Tensor:
        """This step's timestep, one per row."""
        if self.driven:
            return self.timestep
        return self.scheduler.timesteps[self.step].reshape(1).expand(self.rows)

    def group(self, forecast: bool) -> tuple:
        """Requests with equal groups share one batched call: the same decision, per-row shapes, condition
        structure and constants (conditions without a batch dimension compared by value)."""
        leaves, spec = pytree.tree_flatten(self.conditions)
        since = self.step - self.extrapolation.step if forecast and self.full is False else None
        return (self.full, since, tuple(self.latents.shape[1:]), self.latents.dtype, spec,
                tuple(self._leaf_key(leaf) for leaf in leaves))

    def _leaf_key(self, leaf: Any) -> Hashable:
        if not isinstance(leaf, torch.Tensor):
            return "constant", leaf
        if leaf.dim() > 0 and leaf.shape[0] == self.rows:
            return "rows", tuple(leaf.shape[1:]), leaf.dtype
        key = (leaf.data_ptr(), leaf._version, tuple(leaf.shape), leaf.dtype)  # pipelines pass one tensor each step
        value = self.shared.get(key)
        if value is None:
            value = self.shared[key] = ("shared", key[2], leaf.dtype, hash(leaf.detach().cpu().numpy().tobytes()))
        return value


class StepBatcher:
    """Runs many DeepCache generations together, one batched U-Net call per step kind and shape per tick.

    `dc` must be compiled with `dynamic=` ranges whose batch covers the largest group (`max_batch` rows per
    call; larger groups are split). `scheduler` is copied per request (`from_config`), so requests with
    different step counts keep their own timesteps. Thread-safe: `submit`, `cancel` and `Request.wait` may be
    called from any thread while one thread runs `tick()` (or `run_forever`).
    """

    def __init__(self, dc: DeepCacheUNet, scheduler, max_batch: int | None = None, gather_s: float = 0.05,
                 join_s: float = 0.01):
        self.served = served = Served.of(dc)
        if served.forecast and served.policy.uses_probe:
            raise ValueError("the StepBatcher runs forecast with policies that decide from the step, not from the "
                             "probe: use a schedule or a calibrated plan with forecast=True, or forecast=False")
        self.dc = dc
        self.scheduler = scheduler
        if max_batch is None:  # the top of the batch range
            engine = isinstance(dc, DeepCacheEngine)
            max_batch = dc.ranges.batch[1] if engine else dc.deepcache_config.dynamic.get("batch", (1, 16))[1]
        self.max_batch = max_batch
        self.gather_s, self.join_s = gather_s, join_s
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.calls = 0  # batched U-Net calls so far
        self.rows = 0  # request rows they carried (rows / calls = the mean batch)
        self.steps = {"full": 0, "cached": 0}  # request steps run, by kind

    def submit(self, latents: torch.Tensor, steps: int, interval: int | None = None,
               schedule: RefreshPolicy | str | None = None, **conditions: Any) -> Request:
        """Adds a generation of `steps` steps starting from `latents` (batch first); returns its `Request`.

        Its policy is `schedule` (a `Schedule`, a `CalibratedPlan`, or another refresh policy or its registered
        name), or uniform 1:`interval`, or the DeepCacheUNet's own. Bad input (no steps, NaN, more rows than
        `max_batch`, a size outside the pair's ranges, a probe policy on pairs without the three-graph split)
        raises here, before the request joins any batch."""
        policy = self._policy(steps, interval, schedule)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        self._check_rows(latents, conditions, scheduler.timesteps[:1].expand(latents.shape[0]))
        with self._lock:
            request = Request(next(self._ids), latents, conditions, scheduler, policy, steps)
            self._requests[request.id] = request
        self._wake.set()
        return request

    def join(self, steps: int, interval: int | None = None, schedule: RefreshPolicy | str | None = None) -> Request:
        """A request of `steps` denoising steps driven from outside: each step is one `call`. Its policy is chosen
        as `submit` chooses it. It takes part in ticks from its first call and leaves after its last.

        Example:
            >>> request = batcher.join(steps=20, interval=5)
            >>> out = batcher.call(request, latents, t, encoder_hidden_states=text)  # in the pipeline's thread
        """
        policy = self._policy(steps, interval, schedule)
        return Request(next(self._ids), torch.empty(0), {}, None, policy, steps)

    def call(self, request: Request, sample: torch.Tensor, timestep: Any, **conditions: Any) -> torch.Tensor:
        """Runs one step of a joined request in the next tick, batched with the others; returns the model output
        for `sample` (blocking). `timestep` is a number, a 0-d tensor or one per row; `conditions` are the model's
        other inputs (tensors with one row per sample row are batched, other values must be equal in a batch).
        The first call checks the rows as `submit` does; a cancelled or failed request raises."""
        if request.done.is_set():
            raise request.error or RuntimeError(f"request {request.id} has finished: join a new one")
        if request.step >= request.steps:
            raise ValueError(f"request {request.id} was joined for {request.steps} steps and was called once more: "
                             "join it with the number of denoising calls the pipeline makes")
        timestep = torch.as_tensor(timestep, device=sample.device)
        rows = sample.shape[0]
        timestep = timestep.reshape(1).expand(rows) if timestep.numel() == 1 else timestep
        if request.step == 0:
            self._check_rows(sample, conditions, timestep)
        with self._lock:
            request.latents, request.timestep, request.conditions = sample, timestep, conditions
            request.answered.clear()
            request.waiting_since = time.monotonic()
            self._requests[request.id] = request
        self._wake.set()
        request.answered.wait()
        if request.error is not None:
            raise request.error
        out, request.answer = request.answer, None
        return out

    def _policy(self, steps: int, interval: int | None, schedule: RefreshPolicy | str | None) -> RefreshPolicy:
        if steps < 1:
            raise ValueError(f"steps={steps}: a generation has at least 1 step")
        policy = resolve_policy(schedule) if schedule is not None else (
            Schedule("uniform", interval=interval) if interval else self.served.policy)
        if policy.uses_probe and not self.served.three:
            raise ValueError("this policy decides from the head's probe: compile the server's pair with "
                             "split='three' (or refresh='adaptive')")
        return policy

    def _check_rows(self, latents: torch.Tensor, conditions: dict[str, Any], timestep: torch.Tensor) -> None:
        """Refuses more rows than a call takes, NaN, and sizes outside the pair's ranges (compiling the pair at the
        first request, rather than in a tick, for a timestep of the dtype the calls will pass: a pair is compiled
        per input dtype). A condition whose first dimension is not the rows has no batch dimension (Flux's token
        ids): requests share a call only where theirs are equal (`Request.group`)."""
        rows = latents.shape[0]
        if rows > self.max_batch:
            raise ValueError(f"this request has {rows} rows, more than the {self.max_batch} one batched "
                             f"call takes (max_batch): split it into requests of at most {self.max_batch} rows")
        named = [(name, leaf) for name, value in conditions.items() for leaf in pytree.tree_leaves(value)
                 if isinstance(leaf, torch.Tensor)]
        check_finite((latents, *(t for _, t in named)), ("latents", *(n for n, _ in named)))
        if self.served.ranges is None:
            self.dc.prepare(**{self.served.sample: latents}, timestep=timestep.to(latents.device).contiguous(),
                            **conditions)
        self.served.ranges.check(tuple(latents.shape), owner="this server's pair",
                                   fix="this server accepts {what} in the pair's ranges only")

    def cancel(self, request: Request) -> None:
        """Drops a request and its cache rows (a client that went away); its `wait` (or `call`) raises."""
        if not request.done.is_set():
            self._finish(request, error=RuntimeError(f"request {request.id} was cancelled"))

    @property
    def active(self) -> int:
        return len(self._requests)

    def tick(self) -> int:
        """Runs one step of every active request that is due one (joined requests: those with a call waiting),
        batched; returns how many requests stepped."""
        with self._lock:
            requests = [r for r in self._requests.values()
                        if not r.done.is_set() and (not r.driven or r.waiting_since is not None)]
        groups: dict[tuple, list[Request]] = {}
        forecast = self.served.forecast
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
        """Ticks while there is work (joined requests: when all are waiting, or the first waited `gather_s`),
        sleeps until a request arrives, returns when `stop` is set."""
        while not stop.is_set():
            wait = self._due_in()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            self.tick()

    def _due_in(self) -> float:
        """Seconds until the next tick is due (0: now). Self-driven requests are always due. Joined ones: when
        every one that has started is waiting, once the newest first call is `join_s` old (requests released
        together by a batched text encoder make their first calls a few milliseconds apart), or `gather_s` after
        the first waiting call whatever the others do."""
        with self._lock:
            requests = list(self._requests.values())
        if not requests:
            return 0.05
        if any(not r.driven for r in requests):
            return 0.0
        waiting = [r for r in requests if r.waiting_since is not None]
        if not waiting:
            return self.gather_s
        now = time.monotonic()
        due = min(r.waiting_since for r in waiting) + self.gather_s
        if len(waiting) == len(requests):
            due = min(due, max(r.waiting_since + self.join_s if r.step == 0 else 0.0 for r in waiting))
        return max(0.0, due - now)

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
            if not request.driven:
                try:
                    t = request.scheduler.timesteps[request.step]
                    request.latents = request.scheduler.step(out, t, request.latents).prev_sample
                except Exception as err:
                    logger.exception("request %d failed in its scheduler", request.id)
                    self._finish(request, error=err)
                    continue
            if was_full and self.served.forecast:
                request.extrapolation.full(cache, request.step)
            request.cache = cache
            request.step += 1
            self.steps["full" if was_full else "cached"] += 1
            if request.driven:
                self._answer(request, out)
            elif request.step == request.steps:
                self._finish(request, result=request.latents)

    def _answer(self, request: Request, out: torch.Tensor) -> None:
        """Hands a joined request's step output to its waiting call; after its last step it leaves."""
        with self._lock:
            request.answer, request.waiting_since = out, None
            if request.step == request.steps:
                self._requests.pop(request.id, None)
                request.cache, request.latents, request.conditions = None, torch.empty(0), {}
        request.answered.set()
        if request.step == request.steps:
            self._finish(request)

    def _run_unet(self, members: list[Request], full: bool | None) -> tuple[tuple[torch.Tensor, ...], list]:
        """One batched call for `members`: their outputs and, per request, `(cache rows, whether full)`."""
        rows = [r.rows for r in members]
        call = {self.served.sample: torch.cat([r.latents for r in members]),
                "timestep": torch.cat([r.timesteps() for r in members])}
        for name in members[0].conditions:
            call[name] = _merged([r.conditions[name] for r in members], rows)
        pair, tensors = self.served.graphs(call)
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
        request.answered.set()  # a joined request's waiting call wakes (and raises `error`)
        for fn in callbacks:
            try:
                fn(request)
            except Exception:  # a waiter's bug must not stop the batcher
                logger.exception("a done-callback of request %d failed", request.id)


def _merged(values: list[Any], rows: list[int]) -> Any:
    """One condition of a batched call from the members' values (equal structures: `Request.group`): tensors with
    one row per sample row concatenated, other leaves (equal in a group) taken from the first member."""
    flat = [pytree.tree_flatten(v)[0] for v in values]
    leaves = []
    for i, first in enumerate(flat[0]):
        batched = isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == rows[0]
        leaves.append(torch.cat([f[i] for f in flat]) if batched else first)
    return pytree.tree_unflatten(leaves, pytree.tree_structure(values[0]))


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
