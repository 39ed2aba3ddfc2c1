"""Latency benchmarks: DeepCache against the baselines a user would pick instead, measured in one run.

For one preset, resolution, batch and step count it measures
- per-call latency of the full and shallow graphs (torch.utils.benchmark medians) per backend;
- DDIM loop latency of: the eager U-Net, `torch.compile` of the U-Net, the reference helper
  (`DeepCacheSDHelper` from PyPI `DeepCache`, when installed) and `compile_deepcache` per backend, schedule and
  interval, interleaved repeat by repeat so that machine noise hits all alike;
- MACs (FlopCounterMode) of full and shallow graphs, hence each row's MAC-bound speedup;
- dispatch efficiency = (F * t_full + S * t_shallow) / measured loop time, from the per-graph medians.
Rows go to CSV and JSON with every setting, the machine and library versions; a Markdown table and PNG plots
are written beside them.
"""

from __future__ import annotations

import csv
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from ..api import compile_deepcache
from ..graph.macs import graph_macs, node_macs
from ..schedule import DEFAULT_CENTER, mac_speedup, make_schedule
from .presets import build_unet, example_call
from .sampling import ddim_loop, interleaved, median, median_ms

__all__ = ["BenchOptions", "run_benchmark", "markdown_table"]


@dataclass(frozen=True)
class BenchOptions:
    preset: str = "sd15"
    resolution: int = 256  # image pixels (latent = /8)
    batch: int = 2  # CFG doubles the prompt batch
    steps: int = 10
    branch: int = 1
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    schedules: tuple[str, ...] = ("uniform", "nonuniform")
    backends: tuple[str, ...] = ("eager", "inductor")
    baselines: tuple[str, ...] = ("unet-eager", "unet-compile", "reference-helper")
    repeats: int = 3
    min_run_time: float = 6.0  # seconds of per-graph timing (after one warm-up call)
    out: str = "bench/results"


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _reference_helper(unet, branch: int, interval: int, call: dict, steps: int):
    """The reference helper on the same U-Net and scheduler; None when PyPI `DeepCache` is not installed.

    The helper finds the step by looking the timestep up in `pipe.scheduler.timesteps`; `ddim_loop`'s
    scheduler has the same timesteps.
    """
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return None
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def loop():
        helper.enable()
        try:
            ddim_loop(unet, call, steps, scheduler)
        finally:
            helper.disable()

    return loop


@dataclass(frozen=True)
class _Candidate:
    name: str
    run: Callable[[], None]
    settings: dict


def run_benchmark(opts: BenchOptions) -> list[dict]:
    """Runs the benchmark and writes CSV, JSON, Markdown and plots under `opts.out`; returns the rows.

    Inductor's freezing is on for the whole run, so the `torch.compile` baseline and the inductor backend
    compile under the same setting (and the baseline never recompiles because the setting changed).

    Example:
        >>> rows = run_benchmark(BenchOptions(preset="tiny-sd", resolution=64, steps=4, backends=("eager",)))
    """
    with torch._inductor.config.patch(freezing=True):
        return _run(opts)


def _run(opts: BenchOptions) -> list[dict]:
    unet = build_unet(opts.preset)
    latent = opts.resolution // 8
    call = example_call(unet, batch=opts.batch, height=latent, width=latent)
    graphs, candidates = {}, []
    bar = tqdm(total=len(opts.backends) + 2, desc="compiling", leave=False)
    for backend in opts.backends:
        dc = compile_deepcache(unet, branch=opts.branch, backend=backend)
        pair = dc.prepare(**call)
        inputs = pair.traced.example_inputs
        with torch.no_grad():
            _, cache = pair.full(*inputs)
            graphs[backend] = (median_ms(lambda: pair.full(*inputs), opts.min_run_time),
                               median_ms(lambda: pair.shallow(*inputs, cache), opts.min_run_time))
        candidates += _deepcache_candidates(dc, call, opts, backend)
        bar.update()
    macs = node_macs(pair.traced.gm, pair.traced.example_inputs)
    full_macs, shallow_macs = sum(macs.values()), graph_macs(pair.split.shallow, macs)
    candidates = _baselines(unet, call, opts) + candidates
    bar.update(2)
    bar.close()
    times = interleaved({c.name: c.run for c in candidates}, opts.repeats, progress=True)
    rows = _rows(candidates, times, graphs, full_macs, shallow_macs, opts)
    _write(rows, opts)
    return rows


def _baselines(unet, call: dict, opts: BenchOptions) -> list[_Candidate]:
    out = []
    if "unet-eager" in opts.baselines:
        out.append(_Candidate("unet-eager", lambda: ddim_loop(unet, call, opts.steps), {"backend": "eager"}))
    if "unet-compile" in opts.baselines:
        compiled = torch.compile(unet)
        ddim_loop(compiled, call, opts.steps)  # compile, and warm up on the loop's own timesteps
        out.append(_Candidate("unet-compile", lambda: ddim_loop(compiled, call, opts.steps), {"backend": "inductor"}))
    if "reference-helper" in opts.baselines:
        for interval in opts.intervals:
            loop = _reference_helper(unet, opts.branch, interval, call, opts.steps)
            if loop is not None:
                out.append(_Candidate(f"reference-helper N={interval}", loop,
                                      {"backend": "eager", "schedule": "uniform", "interval": interval}))
    return out


def _deepcache_candidates(dc, call: dict, opts: BenchOptions, backend: str) -> list[_Candidate]:
    """One candidate per schedule and interval, all sharing `dc`'s compiled pair."""
    out = []
    for kind in opts.schedules:
        for interval in opts.intervals:
            try:
                total = opts.steps if kind == "nonuniform" else None
                schedule = make_schedule(kind, interval, num_inference_steps=total,
                                         center=min(DEFAULT_CENTER, opts.steps // 3))
            except ValueError:  # no non-uniform schedule with ceil(T/N) full steps for this T and N
                continue
            candidate = dc.with_schedule(schedule)
            full = len(candidate.full_steps(opts.steps))
            out.append(_Candidate(f"deepcache {backend} {kind} N={interval}",
                                  (lambda d: lambda: ddim_loop(d, call, opts.steps))(candidate),
                                  {"backend": backend, "schedule": kind, "interval": interval, "full_steps": full}))
    return out


def _rows(candidates, times: dict, graphs, full_macs, shallow_macs, opts: BenchOptions) -> list[dict]:
    base = median(times["unet-eager"]) if "unet-eager" in times else None
    machine = _machine()
    rows = []
    for c in candidates:
        seconds = median(times[c.name])
        row = {"name": c.name, **{k: v for k, v in asdict(opts).items() if k not in ("intervals", "schedules",
               "backends", "baselines", "out")}, **c.settings, "median_s": seconds, "min_s": min(times[c.name]),
               "max_s": max(times[c.name]), "speedup_vs_unet_eager": base / seconds if base else None, **machine}
        if "full_steps" in c.settings:
            full, shallow = c.settings["full_steps"], opts.steps - c.settings["full_steps"]
            t_full, t_shallow = graphs[c.settings["backend"]]
            row.update(full_ms=t_full, shallow_ms=t_shallow, full_gmacs=full_macs / 1e9,
                       shallow_gmacs=shallow_macs / 1e9,
                       mac_bound_speedup=mac_speedup(opts.steps, full, shallow_macs / full_macs),
                       dispatch_efficiency=(full * t_full + shallow * t_shallow) / 1e3 / seconds)
        rows.append(row)
    return rows


def _write(rows: list[dict], opts: BenchOptions) -> None:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{opts.preset}_{opts.resolution}px_b{opts.batch}_branch{opts.branch}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2, default=str))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text(markdown_table(rows))
    _plot(rows, out / f"{stem}.png")


def markdown_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    lines = ["| configuration | median s (min-max) | vs eager U-Net | MAC bound | dispatch eff. |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | "
                     f"{fmt(r['speedup_vs_unet_eager'], '.2f')}x | {fmt(r.get('mac_bound_speedup'), '.2f')} | "
                     f"{fmt(r.get('dispatch_efficiency'), '.2f')} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {}
    for r in rows:
        if "interval" in r and r.get("full_steps") is not None:
            series.setdefault(f"{r['backend']} {r['schedule']}", []).append((r["interval"], r["speedup_vs_unet_eager"]))
            series.setdefault("MAC bound (uniform)" if r["schedule"] == "uniform" else "_", []).append(
                (r["interval"], r["mac_bound_speedup"]))
    for label, points in series.items():
        if label == "_":
            continue
        points = sorted(set(points))
        ax.plot([p[0] for p in points], [p[1] for p in points], "k--" if "MAC" in label else "o-", label=label)
    ax.set_xlabel("interval N")
    ax.set_ylabel("speedup vs eager U-Net")
    ax.set_title(f"{rows[0]['preset']} {rows[0]['resolution']} px, batch {rows[0]['batch']}, branch {rows[0]['branch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
