"""A DeepCache image-generation service with three ways to batch requests, independent of any web framework.

`DeepCacheService(ServeOptions(...))` loads a pixel-space diffusers model (the shipped digits DDPM, or any
folder with `unet/` and `scheduler/` as `DDPMPipeline.save_pretrained` writes it), compiles one dynamic pair
for the options' batch and size ranges and runs generations in one worker thread:

- `batching="step"`: continuous step-level batching (`StepBatcher`): every tick, one batched call for the
  requests due a full step and one for those due a shallow step, whatever their step, size group or schedule;
- `batching="generation"`: whole generations batched (what Ray Serve's `@serve.batch` gives): requests with the
  same size, step count and schedule run as one batched generation, `generate_many`;
- `batching="none"`: one generation at a time, first come first served.

`submit` turns request parameters into a `Job` and refuses bad ones (ValueError naming the fix) before they
cost anything; `generate` / `generate_many` await the final latents; an awaiting task that is cancelled (an
HTTP client that went away) cancels its generation and frees its cache rows.

Example:
    >>> service = DeepCacheService(ServeOptions(batching="step"))
    >>> latents = await service.generate(service.submit(seed=0, steps=20))
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..api import compile_deepcache
from ..runtime.generation import check_finite
from ..runtime.onednn import DEFAULT_ENTRIES, bound_onednn_caches
from ..schedule import Schedule
from .batcher import Request, StepBatcher

__all__ = ["BATCHING", "DeepCacheService", "Job", "ServeOptions", "load_engine", "load_pixel_model"]

BATCHING = ("step", "generation", "none")
DIGITS = Path(__file__).parents[1] / "eval" / "assets" / "digits"  # the shipped model's files (data, not code)
_FIX = "ask for a {what} inside it, or start the server with options that cover it (max_batch, min_size, max_size)"


@dataclass(frozen=True)
class ServeOptions:
    """What a replica serves and how.

    Attributes:
        model: "digits" (the shipped trained DDPM), a folder with `unet/` (a UNet2DModel) and `scheduler/`, or a
            text-to-image pipeline folder written by `save_pretrained` (served by `TextToImageService`).
        batching: "step", "generation" or "none" (see the module docstring; text-to-image: `text2image`).
        branch, interval, backend: as for `compile_deepcache`; `interval` is the default 1:N schedule.
        steps: the default number of denoising steps of a request.
        max_batch: the most sample rows in one U-Net call (the dynamic pair's batch range is 1..max_batch).
        min_size, max_size: the image sizes (pixels, both sides) the pair serves; default half and twice the
            model's sample size. A transformer pipeline serves its own default size, `max_size` alone, or every
            size from `min_size` to `max_size` (Flux: the token counts of those sides).
        threads: torch intra-op threads of the replica (Ray gives an actor as many CPUs as it asks for).
        batch_wait_s: how long `batching="generation"` waits to fill a batch; for text-to-image, how long the text
            encoders and the VAE decoder wait for other requests' calls to batch with.
        onednn_cache: entries of oneDNN's primitive caches (process and per thread; `bound_onednn_caches`),
            set when the replica starts; -1 leaves the library defaults (1,024 each, which many shapes fill).
        engine: an export (`dc.export(dir, ...)` of the same model with `batch=(1, N)`, N >= max_batch) to serve
            instead of compiling: the replica starts in the time it takes to load it (`branch`, `interval`'s
            default, `backend` and `cache_dir` are the export's; the model folder still gives the scheduler and,
            for pipelines, the text encoders and the VAE).
        cache_dir: a compile cache shared by replicas (`compile_deepcache(cache_dir=...)`, backend "aoti"; default:
            `DEEPCACHE_CACHE_DIR`): a replica that finds its pair there loads it instead of compiling.
    """

    model: str = "digits"
    batching: str = "step"
    branch: int = 1
    interval: int = 5
    backend: str = "eager"
    steps: int = 20
    max_batch: int = 16
    min_size: int | None = None
    max_size: int | None = None
    threads: int = 1
    batch_wait_s: float = 0.01
    onednn_cache: int = DEFAULT_ENTRIES
    cache_dir: str | None = None
    engine: str | None = None

    def __post_init__(self):
        if self.batching not in BATCHING:
            raise ValueError(f"batching={self.batching!r}: use one of {', '.join(BATCHING)}")
        for name in ("interval", "steps", "max_batch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.onednn_cache < 1 and self.onednn_cache != -1:
            raise ValueError(f"onednn_cache={self.onednn_cache}: give a number of entries >= 1, or -1 for the "
                             "library defaults")

    @classmethod
    def from_strings(cls, args: dict[str, str]) -> "ServeOptions":
        """Options from `serve run ... key=value` arguments (strings), converted to the fields' types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(args) - set(fields)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}: the options are {sorted(fields)}")
        kinds = {"int": int, "float": float, "int | None": int}
        return cls(**{k: kinds.get(str(fields[k].type), str)(v) for k, v in args.items()})


@dataclass(frozen=True)
class Job:
    """One validated request: its initial latents, step count and schedule."""

    latents: torch.Tensor
    steps: int
    schedule: Schedule


def load_pixel_model(model: str | Path, scheduler_only: bool = False):
    """`(unet, scheduler)` of "digits" or of a diffusers folder with `unet/` and `scheduler/` (`scheduler_only`:
    `(None, scheduler)`, for a service that runs engine files)."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = DIGITS if model == "digits" else Path(model)
    if not (folder / "unet" / "config.json").exists():
        raise FileNotFoundError(f"model={model!r}: no unet/config.json in {folder}; give 'digits' or a folder "
                                "written by DDPMPipeline.save_pretrained (unet/ and scheduler/)")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    if scheduler_only:
        return None, scheduler
    return UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval(), scheduler


def load_engine(options: "ServeOptions"):
    """The engine files of `options.engine` (Python runtime), checked to serve `options.max_batch` rows."""
    from ..artifacts.load import load_deepcache

    engine = load_deepcache(options.engine)
    lo, hi = engine.ranges.batch
    if options.max_batch > hi:
        raise ValueError(f"max_batch={options.max_batch} is more than the engine's batch range {lo}..{hi}: start with "
                         f"max_batch={hi}, or export with batch=(1, {options.max_batch})")
    return engine


class DeepCacheService:
    """Generations of one model on one dynamic pair, batched as `options.batching` says. Thread-safe."""

    def __init__(self, options: ServeOptions):
        self.options = options
        if options.onednn_cache != -1:
            bound_onednn_caches(options.onednn_cache)  # before the model's first convolution
        torch.set_num_threads(options.threads)
        if options.engine is not None:  # the exported pair; the model folder gives the scheduler
            self.dc = load_engine(options)
            self.scheduler = load_pixel_model(options.model, scheduler_only=True)[1]
            config = self.dc.config
        else:
            unet, self.scheduler = load_pixel_model(options.model)
            config = unet.config
        self.channels, self.sample_size = config.in_channels, config.sample_size
        if options.engine is None:
            size = self.sample_size
            lo, hi = options.min_size or max(size // 2, 1), options.max_size or size * 2
            ranges = dict(batch=(1, options.max_batch), height=(lo, hi), width=(lo, hi))
            self.dc = compile_deepcache(unet, branch=options.branch, interval=options.interval,
                                        backend=options.backend, dynamic=ranges, cache_dir=options.cache_dir)
            # compile the pair now (not in the first request) at the model's own size
            self.dc.prepare(sample=torch.zeros(1, self.channels, size, size), timestep=torch.zeros(1, dtype=torch.long))
        self.ranges = self.dc.shape_ranges
        self.max_steps = self.scheduler.config.num_train_timesteps
        self.counts: Counter[str] = Counter()  # completed, cancelled, failed
        self._stop = threading.Event()
        if options.batching == "step":
            self.batcher = StepBatcher(self.dc, self.scheduler, options.max_batch)
            self._worker = threading.Thread(target=self.batcher.run_forever, args=(self._stop,),
                                            name="deepcache-steps", daemon=True)
            self._worker.start()
        else:
            self.batcher = None
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="deepcache-generations")

    def close(self) -> None:
        """Stops the worker thread (requests in flight are not finished)."""
        self._stop.set()
        if self.batcher is None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------------------------- requests
    def submit(self, seed: int = 0, batch: int = 1, height: int | None = None, width: int | None = None,
               steps: int | None = None, interval: int | None = None,
               latents: torch.Tensor | None = None) -> Job:
        """A validated `Job`: noise from `seed` (`torch.Generator().manual_seed(seed)`, shape
        `(batch, channels, height, width)`) unless `latents` are given. Raises ValueError on bad input."""
        steps = self.options.steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps={steps}: a generation has 1..{self.max_steps} steps (the scheduler's "
                             "training steps)")
        if interval is not None and interval < 1:
            raise ValueError(f"interval={interval}: the 1:N schedule needs N >= 1")
        if latents is None:
            size = self.sample_size
            shape = (batch, self.channels, height or size, width or size)
            if min(shape) < 1:
                raise ValueError(f"batch={batch}, height={height}, width={width}: sizes must be at least 1")
        elif latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents of shape {tuple(latents.shape)}: give (batch, {self.channels}, height, width)")
        else:
            shape = tuple(latents.shape)
        self.ranges.check(shape, owner="this server", fix=_FIX)  # before any noise of that size is drawn
        if latents is None:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        else:
            check_finite((latents,), ("latents",))
        schedule = Schedule("uniform", interval=interval or self.options.interval)
        return Job(latents.float().contiguous(), steps, schedule)

    async def generate(self, job: Job) -> torch.Tensor:
        """The final latents of `job` (`batching` "step" or "none"). Cancelling the awaiting task cancels it."""
        if self.batcher is None:
            return (await self._in_worker([job]))[0]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = self.batcher.submit(job.latents, job.steps, schedule=job.schedule)
        request.add_done_callback(lambda r: loop.call_soon_threadsafe(_settle, future, r))
        try:
            result = await future
        except asyncio.CancelledError:
            self.batcher.cancel(request)
            self.counts["cancelled"] += 1
            raise
        except Exception:
            self.counts["failed"] += 1
            raise
        self.counts["completed"] += 1
        return result

    async def generate_many(self, jobs: list[Job]) -> list[torch.Tensor]:
        """Final latents of `jobs`, jobs with equal shapes, steps and schedules batched into one generation."""
        return await self._in_worker(jobs)

    def stats(self) -> dict:
        """Counters: requests completed/cancelled/failed, U-Net calls and the sample rows they carried, and (step
        batching) the active generations."""
        out = {"batching": self.options.batching, **{k: self.counts[k] for k in ("completed", "cancelled", "failed")}}
        if self.batcher is not None:
            return out | {"active": self.batcher.active, "calls": self.batcher.calls, "rows": self.batcher.rows}
        return out | {"calls": self.counts["calls"], "rows": self.counts["rows"]}

    # ------------------------------------------------------------------------------- whole generations (worker)
    async def _in_worker(self, jobs: list[Job]) -> list[torch.Tensor]:
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run_jobs, jobs, cancelled)
        try:
            results = await future
        except asyncio.CancelledError:
            cancelled.set()  # the worker stops this generation at its next step
            self.counts["cancelled"] += len(jobs)
            raise
        except Exception:
            self.counts["failed"] += len(jobs)
            raise
        self.counts["completed"] += len(jobs)
        return results

    def _run_jobs(self, jobs: list[Job], cancelled: threading.Event) -> list[torch.Tensor]:
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((tuple(job.latents.shape[1:]), job.steps, job.schedule), []).append(i)
        results: list[torch.Tensor | None] = [None] * len(jobs)
        for indices in groups.values():
            for chunk in self._calls(jobs, indices):
                latents = self._denoise([jobs[j] for j in chunk], cancelled)
                for j, out in zip(chunk, latents.split([jobs[j].latents.shape[0] for j in chunk])):
                    results[j] = out
        return results

    def _calls(self, jobs: list[Job], indices: list[int]) -> Iterator[list[int]]:
        """`indices` in runs of at most `max_batch` sample rows: a group larger than one call is split."""
        chunk, rows = [], 0
        for i in indices:
            n = jobs[i].latents.shape[0]
            if chunk and rows + n > self.options.max_batch:
                yield chunk
                chunk, rows = [], 0
            chunk.append(i)
            rows += n
        yield chunk

    def _denoise(self, jobs: list[Job], cancelled: threading.Event) -> torch.Tensor:
        """One (batched) DDIM generation of jobs that share shape, steps and schedule, as `ddim_loop` runs it."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(jobs[0].steps)
        latents = torch.cat([job.latents for job in jobs])
        dc = self.dc.with_schedule(jobs[0].schedule)
        with torch.no_grad(), dc.generation():
            for t in scheduler.timesteps:
                if cancelled.is_set():  # nobody awaits the result any more
                    raise RuntimeError("generation cancelled")
                latents = scheduler.step(dc(latents, t).sample, t, latents).prev_sample
                self.counts["calls"] += 1
                self.counts["rows"] += latents.shape[0]
        return latents


def _settle(future: asyncio.Future, request: Request) -> None:
    if future.done():  # the awaiting task was cancelled first
        return
    if request.error is not None:
        future.set_exception(request.error)
    else:
        future.set_result(request.result)
