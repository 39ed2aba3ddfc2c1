"""A text-to-image service: a diffusers pipeline served with DeepCache and step-level batching across requests.

`TextToImageService(ServeOptions(model=<folder>))` loads a pipeline written by `save_pretrained` (Stable
Diffusion, SDXL, PixArt, SD3, Flux: any pipeline with a `unet` or `transformer` and a `prompt` argument),
compiles one dynamic pair of its denoiser and runs each request as the pipeline's own `__call__` in a worker
thread, on a shallow copy of the pipeline in which

- the denoiser is a `BatchedDenoiser`: each of its calls joins the `StepBatcher`'s next tick, so the requests in
  flight run one batched denoiser call per step kind (classifier-free guidance's two halves are two rows of the
  request's call, `guidance_scale` its own);
- the text encoders and the VAE decoder are `Coalescer`s: the encodings of requests that arrive together, and
  the decodes of requests that finish together, run as one batched call;
- the scheduler is the request's own copy.

With `batching="generation"` (what Ray Serve's `@serve.batch` offers) requests of one setting (steps, size,
guidance, schedule) run as one pipeline call with their prompts as a list, each request's latents drawn from its
own seed; with `batching="none"` one request runs at a time.

Everything else (tokenizing, guidance, scheduler steps, post-processing) is the pipeline's own code, so a served
request gives the image of the same pipeline call run alone with `pipe.unet = compile_deepcache(...)`, up to the
rounding of batched arithmetic (tested to 1e-5).

Example:
    >>> service = TextToImageService(ServeOptions(model="path/to/sd-pipeline"))
    >>> images = await service.generate(service.submit(prompt="a red car", seed=0))  # (1, H, W, 3) in [0, 1]
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..api import compile_deepcache
from ..runtime.onednn import bound_onednn_caches
from .batcher import Request, StepBatcher
from .coalesce import Coalescer
from .service import load_engine

__all__ = ["BatchedDenoiser", "Progress", "PromptJob", "TextToImageService", "is_pipeline_folder"]

_KEPT = 1024  # progress records of finished requests kept for `progress`


def is_pipeline_folder(model: str | Path) -> bool:
    """Whether `model` is a diffusers pipeline folder (`model_index.json`, as `save_pretrained` writes it)."""
    return model != "digits" and (Path(model) / "model_index.json").is_file()


@dataclass(frozen=True)
class PromptJob:
    """One validated text-to-image request."""

    id: str
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    steps: int
    seed: int
    height: int
    width: int
    num_images: int
    interval: int


@dataclass
class Progress:
    """Where a request is: `state` one of queued, encoding, denoising, decoding, done, failed, cancelled;
    `step` of `steps` denoising steps done (`steps` is known once denoising starts)."""

    state: str = "queued"
    step: int = 0
    steps: int | None = None
    request: Request | None = field(default=None, repr=False)
    alone: bool = True  # the request's generation is its own (not a group's): cancelling it stops it

    def as_dict(self) -> dict:
        step = self.request.step if self.request is not None and self.state == "denoising" else self.step
        return {"state": self.state, "step": step, "steps": self.steps}


def _absent(folder: str | Path) -> dict[str, None]:
    """The components a pipeline was saved without (`[null, null]` in model_index.json), which `from_pretrained`
    must be told are None."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}


class _Stand(nn.Module):
    """Stands in for a pipeline component: attributes read from `module`, calls through `call`."""

    def __init__(self, module: nn.Module, call):
        super().__init__()
        self.module = module
        self._call = call

    def forward(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


class _Serialized:
    """A tokenizer used by one thread at a time (its call and every method: `tokenize`, `batch_decode`...): a fast
    tokenizer's calls set padding and truncation on the shared Rust object, so concurrent calls with other
    settings corrupt each other's token ids."""

    def __init__(self, tokenizer):
        self._tokenizer, self._lock = tokenizer, threading.RLock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked


class _DecodingVae(_Stand):
    """The VAE with `decode` coalesced. `generator` is not passed on: AutoencoderKL's decode does not use it."""

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return self._call(z, return_dict=return_dict)


class BatchedDenoiser(nn.Module):
    """Stands in for `pipe.unet` / `pipe.transformer` in one request's pipeline: its first call joins the
    batcher with as many steps as the request's scheduler has timesteps, each call waits for its batched tick.

    Example:
        >>> pipe.unet = BatchedDenoiser(batcher, pipe.scheduler, interval=5)
    """

    def __init__(self, batcher: StepBatcher, scheduler, interval: int | None = None,
                 progress: list[Progress] | None = None):
        super().__init__()
        self.model = batcher.dc
        self._batcher, self._scheduler, self._interval = batcher, scheduler, interval
        self._progress = progress or [Progress()]  # of each request the call serves
        self._signature = batcher.served.signature
        self.request: Request | None = None

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if v is not None}
        return_dict = arguments.pop("return_dict", True)
        sample = arguments.pop(next(iter(self._signature.parameters)))
        timestep = arguments.pop("timestep")
        if self.request is None:
            self.request = self._batcher.join(len(self._scheduler.timesteps), interval=self._interval)
            for progress in self._progress:
                progress.request, progress.steps, progress.state = self.request, self.request.steps, "denoising"
        out = self._batcher.call(self.request, sample, timestep, **arguments)
        if self.request.step == self.request.steps:
            for progress in self._progress:
                progress.step, progress.state = self.request.steps, "decoding"
        output_type = self._batcher.served.output_type
        return output_type(sample=out) if return_dict and output_type is not None else (out,)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def _batched_components(pipe, window_s: float):
    """`pipe` with its text encoders and AutoencoderKL decoder coalesced across requests and its tokenizers
    serialized (components replaced in the instance, the modules shared)."""
    from diffusers import AutoencoderKL

    for name, component in pipe.components.items():
        if name.startswith("text_encoder") and isinstance(component, nn.Module):
            pipe.__dict__[name] = _Stand(component, Coalescer(component, window_s))
        elif name.startswith("tokenizer") and component is not None:
            pipe.__dict__[name] = _Serialized(component)
    if type(pipe.vae) is AutoencoderKL:
        pipe.__dict__["vae"] = _DecodingVae(pipe.vae, Coalescer(pipe.vae.decode, window_s))
    return pipe


class TextToImageService:
    """Text-to-image generations of one pipeline, denoised under one `StepBatcher`. Thread-safe.

    `submit(prompt=..., ...)` validates a request into a `PromptJob` (ValueError naming the fix);
    `await generate(job)` returns its images, float32 `(num_images, height, width, 3)` in [0, 1] as the pipeline's
    `output_type="np"` gives them; `progress(id)` says where a request is; `stats()` counts what ran.
    """

    def __init__(self, options):
        self.options = options
        if options.onednn_cache != -1:
            bound_onednn_caches(options.onednn_cache)
        torch.set_num_threads(options.threads)
        pipe, model = self._load(options)
        call = inspect.signature(type(pipe).__call__).parameters
        self._binning = {"use_resolution_binning": False} if "use_resolution_binning" in call else {}
        # Flux's pipelines guide by an embedded scale (one row per image); their negative prompt needs "true" CFG
        # (`true_cfg_scale`), which this service does not offer: refused rather than silently ignored.
        true_cfg = "true_cfg_scale" in call
        self._negative = "negative_prompt" in call and not true_cfg
        self.guidance_rows = 1 if true_cfg or getattr(model.config, "guidance_embeds", False) else 2
        self._packed = hasattr(pipe, "_pack_latents")
        # pixels per latent (Flux: per 2x2-packed token); U-Nets: times their downsampling, once compiled
        self.size_step = pipe.vae_scale_factor * (2 if self._packed else 1)
        self.default_size = self._served_size(pipe, model)
        # a group's latents (batching="generation"): the pipelines draw them in the text embeddings' dtype; Flux's
        # pipelines pack 2x2 latent patches into tokens of 4x the channels (`prepare_latents` draws and packs)
        encoder = getattr(pipe, "text_encoder", None)
        channels = model.config.in_channels // (4 if self._packed else 1)
        self._latents = (channels, encoder.dtype if encoder is not None else torch.float32)
        if self.dc is None:
            self.dc = compile_deepcache(model, branch=options.branch, interval=options.interval,
                                        backend=options.backend, dynamic=self._ranges(pipe),
                                        cache_dir=options.cache_dir)
        self.batcher = StepBatcher(self.dc, pipe.scheduler, options.max_batch)
        self.pipe = _batched_components(pipe, options.batch_wait_s)
        self.max_steps = pipe.scheduler.config.num_train_timesteps
        self.counts: Counter[str] = Counter()
        self._progress: OrderedDict[str, Progress] = OrderedDict()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(options.max_batch if options.batching == "step" else 1,
                                            thread_name_prefix="deepcache-pipelines")
        threading.Thread(target=self.batcher.run_forever, args=(self._stop,), name="deepcache-steps",
                         daemon=True).start()
        self._run([self.submit(prompt="warm up", steps=1)])  # compiles the pair now, not in the first request
        self._forget_warm_up()
        if not self._packed:  # a U-Net's downsampling, a transformer's patch
            self.size_step *= self.dc.shape_ranges.multiple

    def _load(self, options) -> tuple[Any, Any]:
        """The pipeline (without its denoiser's weights when an engine stands in) and the denoiser or engine;
        sets `denoiser` (the component's name) and `dc` (the engine, or None until compiled)."""
        from diffusers import DiffusionPipeline

        index = json.loads((Path(options.model) / "model_index.json").read_text())
        self.denoiser = "transformer" if (index.get("transformer") or [None])[0] else "unet"
        absent = _absent(options.model) | ({self.denoiser: None} if options.engine else {})
        pipe = DiffusionPipeline.from_pretrained(options.model, local_files_only=True, **absent)
        if self.denoiser not in index or "prompt" not in inspect.signature(type(pipe).__call__).parameters:
            raise ValueError(f"model={options.model!r} is a {type(pipe).__name__}: the text-to-image service takes a "
                             "pipeline with a prompt and a `unet` or `transformer` (StableDiffusion, SDXL, PixArt, "
                             "SD3, Flux)")
        pipe.set_progress_bar_config(disable=True)
        self.dc = load_engine(options) if options.engine else None
        return pipe, self.dc if self.dc is not None else getattr(pipe, self.denoiser)

    def _served_size(self, pipe, model) -> int:
        """The default image size (pixels a side): the pipeline's; a transformer given `max_size` alone serves that
        one size, given `min_size` and `max_size` the pipeline's size where it is inside them, else `max_size`."""
        size = (getattr(pipe, "default_sample_size", None) or model.config.sample_size) * pipe.vae_scale_factor
        if self.denoiser != "transformer" or self.options.max_size is None:
            return size
        lo, hi = self.options.min_size, self.options.max_size
        self._check_multiple("max_size", hi)
        if lo is None or lo == hi:
            return hi
        self._check_multiple("min_size", lo)
        if not 0 < lo < hi:
            raise ValueError(f"min_size={lo}, max_size={hi}: give 0 < min_size <= max_size")
        return size if lo <= size <= hi else hi

    def _forget_warm_up(self) -> None:
        self.counts.clear()
        self._progress.clear()
        self.batcher.calls = self.batcher.rows = 0
        self.batcher.steps = dict.fromkeys(self.batcher.steps, 0)
        for stand in self.pipe.__dict__.values():
            if isinstance(stand, _Stand):
                stand._call.calls = stand._call.rows = 0

    def _ranges(self, pipe) -> dict:
        """The dynamic pair's ranges: batch 1..max_batch, and sizes (latent pixels; Flux: the packed token counts)
        from min_size/max_size where both are given; otherwise `compile_deepcache`'s defaults for a U-Net, one
        size (the default) for a transformer."""
        ranges = {"batch": (1, self.options.max_batch)}
        lo, hi = self.options.min_size, self.options.max_size
        if not (lo and hi and (self.denoiser == "unet" or lo < hi)):
            return ranges
        if self._packed:  # (h / step) * (w / step) tokens for sides of lo..hi pixels
            return ranges | {"tokens": ((lo // self.size_step) ** 2, (hi // self.size_step) ** 2)}
        factor = pipe.vae_scale_factor
        return ranges | {"height": (lo // factor, hi // factor), "width": (lo // factor, hi // factor)}

    def close(self) -> None:
        """Stops the step worker (requests in flight are not finished)."""
        self._stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------------------------- requests
    def submit(self, prompt: str | None = None, negative_prompt: str | None = None, guidance_scale: float = 5.0,
               steps: int | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
               num_images: int = 1, interval: int | None = None, id: str | None = None) -> PromptJob:
        """A validated `PromptJob`. Raises ValueError naming the field and the fix."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt: give a non-empty text (this server serves a text-to-image pipeline)")
        if negative_prompt is not None and not self._negative:
            raise ValueError(f"negative_prompt: {type(self.pipe).__name__} takes none; leave it out")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale}: give a finite number >= 0 (1 or less: no guidance)")
        steps = self.options.steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps={steps}: a generation has 1..{self.max_steps} steps")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed={seed}: give an integer in 0..2**63-1")
        if interval is not None and interval < 1:
            raise ValueError(f"interval={interval}: the 1:N schedule needs N >= 1")
        height, width = height or self.default_size, width or self.default_size
        self._check_size(height, width)
        rows = self._rows(num_images=num_images, guidance_scale=guidance_scale)
        if num_images < 1 or rows > self.options.max_batch:
            most = self.options.max_batch // (self.guidance_rows if guidance_scale > 1 else 1)
            raise ValueError(f"num_images={num_images}: this server generates 1..{most} images per request (with "
                             f"guidance each image is {self.guidance_rows} rows of at most {self.options.max_batch})")
        job = PromptJob(id or f"r{next(self._ids)}", prompt, negative_prompt, float(guidance_scale), steps, seed,
                        height, width, num_images, interval or self.options.interval)
        self._track(job.id, Progress())
        return job

    def _rows(self, job: PromptJob | None = None, num_images: int = 1, guidance_scale: float = 0.0) -> int:
        """Denoiser rows of a request: its images, twice with classifier-free guidance (unless the model embeds
        the guidance)."""
        if job is not None:
            num_images, guidance_scale = job.num_images, job.guidance_scale
        return num_images * (self.guidance_rows if guidance_scale > 1 else 1)

    def _check_multiple(self, name: str, value: int) -> None:
        if value % self.size_step:
            raise ValueError(f"{name}={value}: give a multiple of {self.size_step} pixels (the VAE's factor "
                             "times the denoiser's downsampling)")

    def _check_size(self, height: int, width: int) -> None:
        self._check_multiple("height", height)
        self._check_multiple("width", width)
        factor, ranges = self.pipe.vae_scale_factor, self.dc.shape_ranges
        if ranges is None:  # the warm-up, before the pair exists: it compiles at the default size
            return
        if self._packed:
            tokens, (lo, hi) = (height // self.size_step) * (width // self.size_step), ranges.height
            if not lo <= tokens <= hi:
                raise ValueError(f"height={height}, width={width}: {tokens} tokens, and this server serves {lo}..{hi} "
                                 "tokens (start it with other min_size / max_size for more)")
            return
        for name, value, (lo, hi) in (("height", height, ranges.height), ("width", width, ranges.width)):
            if not lo * factor <= value <= hi * factor:
                raise ValueError(f"{name}={value}: this server serves {lo * factor}..{hi * factor} pixels a side "
                                 "(start it with other min_size / max_size for more)")

    async def generate(self, job: PromptJob) -> np.ndarray:
        """The images of `job`. Cancelling the awaiting task cancels its generation."""
        return (await self.generate_many([job]))[0]

    async def generate_many(self, jobs: list[PromptJob]) -> list[np.ndarray]:
        """The images of each of `jobs`: with `batching="generation"`, jobs of one setting (steps, size, guidance,
        interval) run as one pipeline call of at most `max_batch` denoiser rows; otherwise each runs as its own
        call. Cancelling the awaiting task cancels the generations that serve no other request; a job cancelled
        (`cancel`) before its group started gets None."""
        loop = asyncio.get_running_loop()
        groups = list(self._groups(jobs)) if self.options.batching == "generation" else [[job] for job in jobs]
        futures = [loop.run_in_executor(self._executor, self._run, group) for group in groups]
        try:
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            for job in jobs:
                self.cancel(job.id)
            raise
        by_id = {job.id: images for group, images in zip(groups, results) for job, images in zip(group, images)}
        return [by_id[job.id] for job in jobs]  # None: cancelled before its group ran

    def _groups(self, jobs: list[PromptJob]):
        """`jobs` of one setting together, in runs of at most `max_batch` denoiser rows."""
        settings: dict[tuple, list[PromptJob]] = {}
        for job in jobs:
            settings.setdefault((job.steps, job.height, job.width, job.guidance_scale, job.interval), []).append(job)
        for same in settings.values():
            group, rows = [], 0
            for job in same:
                n = self._rows(job)
                if group and rows + n > self.options.max_batch:
                    yield group
                    group, rows = [], 0
                group.append(job)
                rows += n
            yield group

    def cancel(self, id: str) -> None:
        """Cancels a request: queued, it never starts; denoising, its next step raises."""
        progress = self._progress.get(id)
        if progress is None or progress.state in ("done", "failed", "cancelled"):
            return
        progress.state = "cancelled"
        if progress.request is not None and progress.alone:  # a group's generation goes on for the others
            self.batcher.cancel(progress.request)

    def progress(self, id: str) -> dict:
        """`{"state", "step", "steps"}` of a request of this replica (KeyError if it knows none by that id)."""
        return self._progress[id].as_dict()

    def stats(self) -> dict:
        """Requests completed/failed/cancelled, in flight; denoiser calls and the rows they carried, request steps
        by kind (full, cached); text-encoder and VAE calls and rows."""
        coalesced = {name: (stand._call.calls, stand._call.rows) for name, stand in self.pipe.__dict__.items()
                     if isinstance(stand, _Stand)}
        return {"batching": self.options.batching, **{k: self.counts[k] for k in ("completed", "cancelled", "failed")},
                "active": self.batcher.active, "calls": self.batcher.calls, "rows": self.batcher.rows,
                "full_steps": self.batcher.steps["full"], "cached_steps": self.batcher.steps["cached"],
                **{f"{name}_calls": calls for name, (calls, _) in coalesced.items()},
                **{f"{name}_rows": rows for name, (_, rows) in coalesced.items()}}

    # ------------------------------------------------------------------------------------------------ worker
    def _track(self, id: str, progress: Progress) -> None:
        self._progress[id] = progress
        while len(self._progress) > _KEPT and next(iter(self._progress.values())).state in ("done", "failed",
                                                                                             "cancelled"):
            self._progress.popitem(last=False)

    def _run(self, jobs: list[PromptJob]) -> list[np.ndarray | None]:
        """Requests of one setting, in a worker thread: the pipeline's own call on a copy with the batched
        components; several requests' prompts as a list and their latents each drawn from its own seed. A request
        of a group that was cancelled before the group started is left out (None in its place)."""
        live = [job for job in jobs if self._progress[job.id].state != "cancelled"]
        self.counts["cancelled"] += len(jobs) - len(live)
        if not live:
            raise RuntimeError(f"request {jobs[0].id} was cancelled")
        if len(live) < len(jobs):
            done = dict(zip((job.id for job in live), self._run(live)))
            return [done.get(job.id) for job in jobs]
        progress = [self._progress[job.id] for job in jobs]
        for p in progress:
            p.state, p.alone = "encoding", len(jobs) == 1
        pipe = copy.copy(self.pipe)
        scheduler = pipe.__dict__["scheduler"] = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        pipe.__dict__[self.denoiser] = BatchedDenoiser(self.batcher, scheduler, jobs[0].interval, progress)
        first = jobs[0]
        kwargs = dict(guidance_scale=first.guidance_scale, num_inference_steps=first.steps, height=first.height,
                      width=first.width, output_type="np", **self._binning)
        if len(jobs) == 1:
            kwargs |= dict(prompt=first.prompt, num_images_per_prompt=first.num_images,
                           generator=torch.Generator().manual_seed(first.seed))
            if first.negative_prompt is not None:  # else the pipeline's default (PixArt's is "", None fails there)
                kwargs["negative_prompt"] = first.negative_prompt
        else:
            kwargs |= self._group_call(pipe, jobs)
        try:
            with torch.no_grad():
                images = np.asarray(pipe(**kwargs).images, dtype=np.float32)
        except BaseException:
            state = "cancelled" if any(p.state == "cancelled" for p in progress) else "failed"
            for p in progress:
                p.state = state
            self.counts[state] += len(jobs)
            request = progress[0].request
            if request is not None:
                self.batcher.cancel(request)  # frees its rows if it failed mid-way
            raise
        for p in progress:  # a request cancelled while its group ran: its images are dropped
            p.state, p.request = ("cancelled" if p.state == "cancelled" else "done"), None
            self.counts["cancelled" if p.state == "cancelled" else "completed"] += 1
        return list(np.split(images, np.cumsum([job.num_images for job in jobs])[:-1]))

    def _group_call(self, pipe, jobs: list[PromptJob]) -> dict:
        """The arguments of one pipeline call for several requests: one prompt (and negative prompt) per image,
        and the latents each request's own generator draws, as `prepare_latents` would draw them alone."""
        from diffusers.utils.torch_utils import randn_tensor

        channels, dtype = self._latents
        factor = self.pipe.vae_scale_factor
        generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
        if self._packed:  # drawn and packed as the pipeline does (its latents argument takes packed ones)
            latents = torch.cat([pipe.prepare_latents(job.num_images, channels, job.height, job.width, dtype,
                                                      torch.device("cpu"), g)[0] for job, g in zip(jobs, generators)])
        else:
            latents = torch.cat([randn_tensor((job.num_images, channels, job.height // factor, job.width // factor),
                                              generator=g, dtype=dtype) for job, g in zip(jobs, generators)])
        repeat = [job for job in jobs for _ in range(job.num_images)]
        call = dict(prompt=[job.prompt for job in repeat], latents=latents,
                    generator=[g for job, g in zip(jobs, generators) for _ in range(job.num_images)])
        if self._negative:
            call["negative_prompt"] = [job.negative_prompt or "" for job in repeat]
        return call
