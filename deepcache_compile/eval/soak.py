"""Soak: many generations of the digits model through long-lived DeepCacheUNets, as a server runs them.

Random sizes, batch sizes, step counts, schedules and backends, in chunks run one after the other or from
several threads at once, with a few broken generations (NaN latents) mixed in. Each generation is compared
with the same generation run alone on the same model (bitwise); the broken ones must fail with a clear error
and take no other generation down. Resident memory is read after a warm-up and at the end, the compiled pairs
held are counted after every chunk, and the temp folder is compared before and after.

`bench/soak.py` runs 1,000 generations; `tests/test_soak.py` a short version.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..api import compile_deepcache
from ..runtime.dispatch import DeepCacheUNet
from ..runtime.onednn import DEFAULT_ENTRIES, bound_onednn_caches
from ..schedule import Schedule
from .digits import load_digits_model
from .memory import resident
from .sampling import ddim_loop

logger = logging.getLogger(__name__)

__all__ = ["SoakJob", "SoakReport", "run_soak", "BACKENDS"]

# "<backend>" compiles one static pair per shape (an LRU of MAX_SIGNATURES); "<backend>-dynamic" one pair for
# every shape in DIGITS_RANGES.
BACKENDS = ("eager", "eager-dynamic", "inductor-dynamic", "onnxruntime-dynamic")
MAX_SIGNATURES = 4
DIGITS_RANGES = dict(batch=(1, 4), height=(8, 24), width=(8, 24))
SIZES = (8, 12, 16, 20, 24)  # multiples of the digits U-Net's downsampling factor (4)
# Compilers' own caches in the temp folder: shared across runs by design, not left behind by this project.
COMPILER_CACHES = ("torchinductor_",)


@dataclass(frozen=True)
class SoakJob:
    """One generation: which model, the noise's shape and seed, the step count and the schedule."""

    backend: str
    batch: int
    height: int
    width: int
    steps: int
    schedule: Schedule
    seed: int
    broken: bool = False  # a NaN in the latents: must fail alone, with a clear error


@dataclass
class SoakReport:
    """What a soak found. `passed` is the verdict; the rest are the figures behind it."""

    generations: int = 0
    threaded: int = 0
    broken_refused: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    live_end_mb: float = 0.0  # rss_end_mb after malloc_trim: the difference is freed heap that glibc kept
    rss_trace_mb: list[float] = field(default_factory=list)  # every 10 chunks
    most_pairs: dict[str, int] = field(default_factory=dict)
    temp_left: list[str] = field(default_factory=list)
    seconds: float = 0.0
    onednn_cache: int = DEFAULT_ENTRIES  # -1: the library defaults

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mb / self.rss_warm_mb - 1 if self.rss_warm_mb else 0.0

    def bounded(self) -> bool:
        return all(n <= (1 if name.endswith("-dynamic") else MAX_SIGNATURES) for name, n in self.most_pairs.items())

    @property
    def passed(self) -> bool:
        return (not self.mismatches and not self.errors and not self.temp_left and self.bounded()
                and self.rss_growth < 0.05)


def draw_jobs(count: int, backends: tuple[str, ...], seed: int, broken_share: float = 0.02) -> list[SoakJob]:
    """`count` random generations (reproducible from `seed`)."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        steps = rng.randint(3, 12)
        interval = rng.choice((2, 3, 5))
        schedule = Schedule("uniform", interval=interval)
        if rng.random() < 0.25:
            try:
                schedule = Schedule("nonuniform", interval=interval, num_inference_steps=steps, center=steps // 2)
                schedule.full_steps()
            except ValueError:  # no such non-uniform schedule for this step count: keep the uniform one
                schedule = Schedule("uniform", interval=interval)
        jobs.append(SoakJob(backend=rng.choice(backends), batch=rng.randint(1, 4), height=rng.choice(SIZES),
                            width=rng.choice(SIZES), steps=steps, schedule=schedule, seed=rng.randrange(1 << 16),
                            broken=rng.random() < broken_share))
    return jobs


def run_soak(generations: int = 1000, backends: tuple[str, ...] = BACKENDS, seed: int = 0, chunk: int = 4,
             warmup: float = 0.2, broken_share: float = 0.02, progress: bool = True,
             onednn_cache: int = DEFAULT_ENTRIES, warm_shapes: bool = False) -> SoakReport:
    """Runs `generations` random generations in chunks of `chunk`, every other chunk (at random) from `chunk`
    threads at once; resident memory is taken once `warmup` of them have run; `broken_share` of them get NaN
    latents. oneDNN's primitive caches are bounded at `onednn_cache` entries first, as a server does
    (`bound_onednn_caches`; -1 keeps the library's 1,024 per thread, which this many shapes fill: +12.9 % RSS
    in the 1,000-generation run of eager, eager-dynamic and onnxruntime-dynamic).
    With `warm_shapes`, the warm-up first runs every shape the dynamic backends can meet once (2 steps each), as
    a server warms up before taking traffic: what a dynamic Inductor pair compiles per shape class (see
    `runtime/backends/inductor.py`) is then compiled before resident memory is first read.

    Example:
        >>> report = run_soak(100, backends=("eager-dynamic",))
        >>> report.passed, f"{report.rss_growth:+.1%}"
    """
    if onednn_cache != -1:
        bound_onednn_caches(onednn_cache)
    unet, scheduler = load_digits_model()
    temp = tempfile.gettempdir()
    temp_before = set(os.listdir(temp))
    models = {name: _model(unet, name) for name in backends}
    views: dict[tuple[str, Schedule], DeepCacheUNet] = {}
    jobs = draw_jobs(generations, backends, seed, broken_share)
    report = SoakReport(most_pairs={name: 0 for name in backends}, onednn_cache=onednn_cache)
    rng = random.Random(seed + 1)
    start = time.perf_counter()
    if warm_shapes:
        for name in backends:
            if name.endswith("-dynamic"):
                lo, hi = DIGITS_RANGES["batch"]
                for batch, height, width in itertools.product(range(lo, hi + 1), SIZES, SIZES):
                    ddim_loop(models[name], {"sample": torch.randn(batch, 1, height, width)}, 2, scheduler)
    warm_at = max(1, int(generations * warmup))
    with ThreadPoolExecutor(max_workers=chunk) as pool:
        for first in tqdm(range(0, len(jobs), chunk), desc="soak", disable=not progress):
            batch = jobs[first:first + chunk]
            # Jobs with the same backend and schedule share one module (and its per-thread state), as the
            # requests of a server share `pipe.unet`; all of a backend's modules share its compiled pairs.
            for job in batch:
                if (job.backend, job.schedule) not in views:
                    views[job.backend, job.schedule] = models[job.backend].with_schedule(job.schedule)
            run = [(views[job.backend, job.schedule], job) for job in batch]
            expected = [None if job.broken else _outcome(model, job, scheduler) for model, job in run]
            if rng.random() < 0.5:
                results = list(pool.map(lambda item: _outcome(*item, scheduler), run))
                report.threaded += len(batch)
            else:
                results = [_outcome(model, job, scheduler) for model, job in run]
            for job, reference, result in zip(batch, expected, results):
                _judge(report, job, reference, result)
            for name, model in models.items():
                report.most_pairs[name] = max(report.most_pairs[name], len(model.pairs))
            report.generations += len(batch)
            if report.generations >= warm_at and not report.rss_warm_mb:
                report.rss_warm_mb = _rss_mb()
            if first // chunk % 10 == 0:
                report.rss_trace_mb.append(round(_rss_mb(), 1))
    report.rss_end_mb = _rss_mb()
    report.live_end_mb = resident() / 2**20  # last: trimming earlier would lower the later readings
    report.seconds = time.perf_counter() - start
    report.temp_left = sorted(name for name in set(os.listdir(temp)) - temp_before
                              if not name.startswith(COMPILER_CACHES))
    return report


def _model(unet, name: str) -> DeepCacheUNet:
    backend, _, kind = name.partition("-")
    return compile_deepcache(unet, branch=1, backend=backend, max_signatures=MAX_SIGNATURES,
                             dynamic=DIGITS_RANGES if kind == "dynamic" else False)


def _generate(model: DeepCacheUNet, job: SoakJob, scheduler) -> torch.Tensor:
    noise = torch.randn(job.batch, 1, job.height, job.width, generator=torch.Generator().manual_seed(job.seed))
    if job.broken:
        noise[0, 0, 0, 0] = float("nan")
    return ddim_loop(model, {"sample": noise}, job.steps, scheduler)


def _outcome(model: DeepCacheUNet, job: SoakJob, scheduler) -> torch.Tensor | Exception:
    try:
        return _generate(model, job, scheduler)
    except Exception as err:  # judged by the caller: a broken job must fail, no other may
        return err


def _judge(report: SoakReport, job: SoakJob, reference, result) -> None:
    what = dataclasses.replace(job, schedule=job.schedule.kind + str(job.schedule.interval))
    if job.broken:
        if isinstance(result, ValueError) and "NaN" in str(result):
            report.broken_refused += 1
        else:
            report.errors.append(f"{what}: NaN latents gave {result!r:.200} instead of a clear error")
    elif isinstance(result, Exception) or isinstance(reference, Exception):
        err = result if isinstance(result, Exception) else reference
        report.errors.append(f"{what}: {type(err).__name__}: {str(err)[:300]}")
    elif not torch.equal(result, reference):
        report.mismatches.append(f"{what}: differs from its run alone by {(result - reference).abs().max():.3g}")


def _rss_mb() -> float:
    """The resident set as the operating system sees it (freed heap glibc kept included), after a collection."""
    gc.collect()
    return resident(trim=False) / 2**20
