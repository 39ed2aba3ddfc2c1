"""The main job. Default: the trained digits DDPM, with and without DeepCache; `--preset sd15`: the SD 1.5
architecture, checked for exactness and timed.

Digits (`run_digits_demo`): samples a grid of digits with the full model and with DeepCache from the same noise,
times both (interleaved, medians), and prints the latency ratio and the quality figures of `quality.py`
(Frechet distance to real digits, classifier confidence, agreement and PSNR against the full model); the grids
go to PNG files.

Architecture (`run_demo`): random weights give the real architecture and the real latency (nothing can be
downloaded here). It
1. lists the branches with their MAC shares, 2. checks the core invariant (full graph == U-Net and
shallow(cache) == full, bitwise, eager fp32) for a few branches, 3. times the full and shallow graphs per
branch, and 4. times a DDIM loop with the plain U-Net against DeepCache (N=5), eager and Inductor, the two
interleaved so that machine noise hits both alike.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import compile_deepcache, list_branches
from .presets import build_unet, example_call
from .sampling import busy_warning, ddim_loop, interleaved, median, median_ms, timed

__all__ = ["DemoOptions", "DigitsDemoOptions", "run_demo", "run_digits_demo"]


@dataclass(frozen=True)
class DigitsDemoOptions:
    samples: int = 256
    steps: int = 50
    branch: int = 0  # with N=3: 2.54x fewer MACs; FD 7.4 vs 3.9, PSNR 31.6 dB at 500 samples (bench/results/quality)
    interval: int = 3
    repeats: int = 3
    seed: int = 0
    out: str = "demo_out"


def run_digits_demo(opts: DigitsDemoOptions = DigitsDemoOptions()) -> dict:
    """Generates digits with the full model and with DeepCache, prints latency and quality; returns the figures.

    Example:
        >>> run_digits_demo(DigitsDemoOptions(samples=16, steps=10, repeats=1))
    """
    from .digits import load_digits_model
    from .quality import save_grid

    unet, scheduler = load_digits_model()
    noise = torch.randn(opts.samples, 1, 16, 16, generator=torch.Generator().manual_seed(opts.seed))
    dc = compile_deepcache(unet, branch=opts.branch, interval=opts.interval)
    dc.prepare(noise, torch.tensor(999))
    print(f"trained digits DDPM (16x16), {opts.samples} samples, DDIM {opts.steps} steps, "
          f"DeepCache branch {opts.branch} N={opts.interval} ({len(dc.full_steps(opts.steps))} full steps), "
          f"{torch.get_num_threads()} threads, eager fp32", flush=True)
    images = {}

    def sample(name, model):
        images[name] = ddim_loop(model, {"sample": noise}, opts.steps, scheduler).clamp(-1, 1)

    times = interleaved({name: (lambda n=name, m=model: sample(n, m)) for name, model in
                         (("full", unet), ("deepcache", dc))}, opts.repeats, progress=True)
    figures = _digits_figures(images["full"], images["deepcache"], times, opts)
    _print_digits_figures(figures, opts)
    warning = busy_warning(times)
    if warning:
        print(f"\nwarning: {warning}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, batch in images.items():
        save_grid(batch[:128], out / f"digits_{name}.png")
    print(f"grids: {out / 'digits_full.png'}, {out / 'digits_deepcache.png'}")
    return figures


def _digits_figures(full: torch.Tensor, fast: torch.Tensor, times: dict, opts: DigitsDemoOptions) -> dict:
    from .quality import Judge

    judge = Judge()
    full_s, fast_s = median(times["full"]), median(times["deepcache"])
    full_scores, fast_scores = judge.score(full), judge.score(fast, full)
    return {"full_s": full_s, "deepcache_s": fast_s, "speedup": full_s / fast_s,
            "mse": fast_scores["mse"], "psnr": fast_scores["psnr"], "agreement": fast_scores["agreement"],
            "fd_full": full_scores["fd"], "fd_deepcache": fast_scores["fd"],
            "confidence_full": full_scores["confidence"], "confidence_deepcache": fast_scores["confidence"],
            "fd_real": judge.reference_rows(opts.samples, opts.seed)[0]["fd"]}


def _print_digits_figures(f: dict, opts: DigitsDemoOptions) -> None:
    print(f"\n{'':>10} {'seconds':>8} {'FD':>7} {'confidence':>11}")
    print(f"{'full':>10} {f['full_s']:>8.2f} {f['fd_full']:>7.2f} {f['confidence_full']:>11.3f}")
    print(f"{'DeepCache':>10} {f['deepcache_s']:>8.2f} {f['fd_deepcache']:>7.2f} {f['confidence_deepcache']:>11.3f}")
    print(f"\nspeedup {f['speedup']:.2f}x (median of {opts.repeats} interleaved runs)")
    print(f"DeepCache vs full model from the same noise: PSNR {f['psnr']:.1f} dB, same digit class "
          f"{f['agreement']:.1%}")
    print(f"FD (classifier features) reference: {opts.samples} real digits vs the other real digits "
          f"{f['fd_real']:.2f}")


@dataclass(frozen=True)
class DemoOptions:
    preset: str = "sd15"
    resolution: int = 256  # image pixels; the latent is resolution / 8
    batch: int = 1
    branches: tuple[int, ...] = (0, 1, 2, 3)
    interval: int = 5
    loop_branch: int = 1
    steps: int = 10
    backends: tuple[str, ...] = ("eager", "inductor")
    repeats: int = 3
    min_run_time: float = 2.0  # seconds per torch.utils.benchmark measurement


def _check_and_time_branches(unet, call: dict, opts: DemoOptions) -> None:
    with torch.no_grad():
        reference = unet(**call).sample
    print(f"\n{'branch':>6} {'exact':>6} {'full ms':>9} {'shallow ms':>11} {'ratio':>6}")
    for b in opts.branches:
        pair = compile_deepcache(unet, branch=b).prepare(**call)
        inputs = pair.traced.example_inputs
        with torch.no_grad():
            sample, cache = pair.full(*inputs)
            exact = torch.equal(sample, reference) and torch.equal(pair.run_shallow(*inputs, cache=cache), sample)
            full_ms = median_ms(lambda: pair.full(*inputs), opts.min_run_time)
            shallow_ms = median_ms(lambda: pair.shallow(*inputs, cache), opts.min_run_time)
        print(f"{b:>6} {str(exact):>6} {full_ms:>9.1f} {shallow_ms:>11.1f} {full_ms / shallow_ms:>5.2f}x")
        if not exact:
            raise SystemExit(f"exactness check failed at branch {b}")


def _time_loops(unet, call: dict, opts: DemoOptions) -> None:
    print(f"\nDDIM {opts.steps} steps, branch {opts.loop_branch}, N={opts.interval} "
          f"(medians of {opts.repeats} interleaved runs)")
    print(f"{'backend':>9} {'compile s':>10} {'U-Net s':>9} {'DeepCache s':>12} {'speedup':>8} {'full':>5}")
    plain = unet
    n_full = len(compile_deepcache(unet, branch=opts.loop_branch, interval=opts.interval).full_steps(opts.steps))
    for backend in opts.backends:
        dc = compile_deepcache(unet, branch=opts.loop_branch, interval=opts.interval, backend=backend)
        print(f"{backend:>9} compiling ...", end="\r", file=sys.stderr, flush=True)  # progress (minutes at SD size)
        _, compile_s = timed(lambda: dc.prepare(**call))
        if backend == "inductor":
            # The baseline a user would pick instead: torch.compile of the whole U-Net, with the same freezing.
            plain = torch.compile(unet, backend="inductor")
            ddim_loop(plain, call, opts.steps)
        times = interleaved({"unet": lambda m=plain: ddim_loop(m, call, opts.steps),
                             "deepcache": lambda m=dc: ddim_loop(m, call, opts.steps)}, opts.repeats)
        base_s, fast_s = median(times["unet"]), median(times["deepcache"])
        print(f"{backend:>9} {compile_s:>10.1f} {base_s:>9.2f} {fast_s:>12.2f} {base_s / fast_s:>7.2f}x {n_full:>5}")
        warning = busy_warning(times)
        if warning:
            print(f"{'':>9} warning: {warning}")


def run_demo(opts: DemoOptions = DemoOptions()) -> None:
    """Runs the demo and prints its tables.

    Example:
        >>> run_demo(DemoOptions(preset="tiny-sd", resolution=64, backends=("eager",)))
    """
    torch.manual_seed(0)
    print(f"building {opts.preset} U-Net (random weights) ...", flush=True)
    unet = build_unet(opts.preset)
    latent = opts.resolution // 8
    call = example_call(unet, batch=opts.batch, height=latent, width=latent)
    print(f"{opts.preset} at {opts.resolution} px (latent {latent}x{latent}), batch {opts.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"\n{'branch':>6} {'skip from':>32} {'consumed by':>24} {'shallow MACs':>13}")
    for row in list_branches(unet, **call):
        print(f"{row.index:>6} {row.producer_module:>32} {row.consumer_module:>24} {row.mac_share:>12.1%}")
    _check_and_time_branches(unet, call, opts)
    with torch._inductor.config.patch(freezing=True):  # baseline and backend compile alike, no recompiles
        _time_loops(unet, call, opts)
