"""One DDIM loop, one loop for any diffusers scheduler, one interleaved timer and one median for every measurement the evaluation makes."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import torch
from diffusers import DDIMScheduler
from torch.utils import benchmark
from tqdm import tqdm

__all__ = ["ddim_loop", "sample_loop", "busy_warning", "interleaved", "median", "median_ms", "timed"]


def ddim_loop(model: Callable, call: dict, steps: int, scheduler: DDIMScheduler | None = None) -> torch.Tensor:
    """A plain DDIM (eta 0) denoising loop of `steps` U-Net calls, as a pipeline runs it; returns the latents.

    `model(latents, t, **extra)` must return an object with `.sample` (a diffusers U-Net, a DeepCacheUNet, an
    engine). `call` gives the initial `sample` and the other keyword arguments (its `timestep` is ignored).
    `scheduler` gives the noise schedule (its config is copied, it is not mutated); default: DDIM over 1,000
    linear-beta steps, Stable Diffusion's.

    Example:
        >>> latents = ddim_loop(dc, {"sample": noise}, steps=50, scheduler=scheduler)
    """
    scheduler = DDIMScheduler.from_config(scheduler.config) if scheduler else DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = call["sample"]
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(model(latents, t, **extra).sample, t, latents).prev_sample
    return latents


def sample_loop(model: Callable, call: dict, steps: int, scheduler) -> torch.Tensor:
    """The denoising loop diffusers' pipelines run, for any scheduler: the initial noise times
    `init_noise_sigma`, `scale_model_input` before each model call, `step` after it; returns the latents.

    `scheduler`'s config is copied into a fresh instance of its class (it is not mutated); `call` as in `ddim_loop`.

    Example:
        >>> latents = sample_loop(engine, {"sample": noise}, 25, DPMSolverMultistepScheduler())
    """
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    latents = call["sample"] * scheduler.init_noise_sigma
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(scheduler.scale_model_input(latents, t), t, **extra).sample
            latents = scheduler.step(output, t, latents).prev_sample
    return latents


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`(fn(), seconds it took)`."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def interleaved(candidates: Mapping[str, Callable[[], Any]], repeats: int, progress: bool = False,
                ) -> dict[str, list[float]]:
    """Seconds of each candidate over `repeats` rounds, candidates taking turns within each round, so that
    machine noise (a shared, throttled CPU) hits all of them alike. Compare medians of the lists.

    Example:
        >>> times = interleaved({"unet": lambda: ddim_loop(unet, call, 10), "dc": lambda: ddim_loop(dc, call, 10)}, 3)
        >>> median(times["unet"]) / median(times["dc"])
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in tqdm(range(repeats), desc="interleaved repeats", disable=not progress):
        for name, fn in candidates.items():
            times[name].append(timed(fn)[1])
    return times


BUSY_SPREAD = 0.25  # runs of one candidate further apart than this: the machine was doing something else


def busy_warning(times: Mapping[str, list[float]]) -> str | None:
    """A warning where the repeated runs of a candidate spread by more than `BUSY_SPREAD` (slowest / fastest - 1):
    something else was using the machine, and a ratio of medians means little. None otherwise (or with one run).

    Example:
        >>> busy_warning({"full": [10.0, 10.2], "deepcache": [4.0, 6.0]})
        'the machine was busy: deepcache's runs differ by 50% (full 2%); rerun on an idle machine before reading the speedup'
    """
    spreads = {name: max(runs) / min(runs) - 1 for name, runs in times.items() if len(runs) > 1}
    if not spreads or max(spreads.values()) <= BUSY_SPREAD:
        return None
    worst = max(spreads, key=spreads.get)
    others = ", ".join(f"{name} {spread:.0%}" for name, spread in spreads.items() if name != worst)
    return (f"the machine was busy: {worst}'s runs differ by {spreads[worst]:.0%}" + (f" ({others})" if others else "")
            + "; rerun on an idle machine before reading the speedup")


def median_ms(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median milliseconds of `fn()` after one warm-up call (torch.utils.benchmark)."""
    fn()  # warm-up: the first call after compiling allocates and initializes
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                           ).blocked_autorange(min_run_time=min_run_time).median * 1e3
