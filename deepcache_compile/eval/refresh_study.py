"""Refresh policies at equal cost on the trained digits DDPM: `deepcache-compile quality --policies`.

For each DDIM step count T and each budget of full steps that uniform N (2, 3, 5, 10) spends, every policy runs
from the same noise as the full model (DDIM eta = 0, so samples are paired):
- `uniform` (full at 0, N, 2N, ...) and `nonuniform` (the paper's schedule, same number of full steps);
- `calibrated`: the plan with the least recorded feature drift (`DeepCacheUNet.calibrate`), calibrated on a
  separate batch of noise (another seed), as a user would on their own example inputs;
- `adaptive`: the threshold tuned by bisection on that calibration batch to spend the same number of full
  steps (the count on the evaluation batch is reported as measured), `max_skip` = 2N;
each with and without `forecast`. Scores as in `quality`: FD, PSNR against the full model, same-class rate,
plus the MACs actually spent (full steps counted from the generation's history).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..api import compile_deepcache, list_branches
from ..refresh import AdaptiveRefresh
from ..runtime.calibrate import record
from ..schedule import make_schedule, mac_speedup, uniform_full_steps
from .digits import ASSETS, load_digits_model
from .quality import Judge
from .sampling import ddim_loop, timed

__all__ = ["RefreshStudyOptions", "bisect_threshold", "evaluate_refresh", "refresh_table", "write_refresh_results"]

POLICIES = ("uniform", "nonuniform", "calibrated", "adaptive")


@dataclass(frozen=True)
class RefreshStudyOptions:
    steps: tuple[int, ...] = (50, 100)
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    branch: int = 1
    samples: int = 500
    calibration_samples: int = 32
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    forecast: tuple[bool, ...] = (False, True)
    out: str = "out/refresh"  # ignored by git; records pass --out bench/results/refresh
    assets: str = str(ASSETS)


class _Study:
    def __init__(self, opts: RefreshStudyOptions):
        self.opts = opts
        self.unet, self.scheduler = load_digits_model(Path(opts.assets))
        self.judge = Judge(Path(opts.assets))
        self.noise = torch.randn(opts.samples, 1, 16, 16, generator=torch.Generator().manual_seed(opts.seed))
        self.calibration_noise = torch.randn(opts.calibration_samples, 1, 16, 16,
                                             generator=torch.Generator().manual_seed(opts.seed + 1))
        self.share = next(b.mac_share for b in list_branches(self.unet, self.noise[:1], 0) if b.index == opts.branch)
        # One DeepCacheUNet per compiled form; schedules and thresholds are swapped with `with_schedule`.
        self.dcs = {(split, forecast): compile_deepcache(self.unet, branch=opts.branch, split=split, forecast=forecast)
                    for split in ("pair", "three") for forecast in opts.forecast}

    def sample(self, dc, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
        images, seconds = timed(lambda: ddim_loop(dc, {"sample": noise}, steps, self.scheduler))
        return images.clamp(-1, 1), seconds

    def tune_threshold(self, dc, steps: int, full_steps: int, max_skip: int) -> float:
        """The threshold whose adaptive run on the calibration batch spends `full_steps` full steps (closest)."""
        def spent(threshold: float) -> int:
            adaptive = dc.with_schedule(AdaptiveRefresh(threshold, max_skip))
            self.sample(adaptive, self.calibration_noise, steps)
            return adaptive.history.count("F")

        return bisect_threshold(spent, full_steps)

    def row(self, dc, steps: int, interval: int, policy: str, forecast: bool, full: torch.Tensor, **extra) -> dict:
        images, seconds = self.sample(dc, self.noise, steps)
        spent = dc.history.count("F")
        return {"steps": steps, "interval": interval, "budget": len(uniform_full_steps(steps, interval)),
                "policy": policy, "forecast": forecast, "full_steps": spent, "branch": self.opts.branch,
                "mac_fraction": 1 / mac_speedup(steps, spent, self.share), "seconds": seconds,
                **self.judge.score(images, full), **extra}


def bisect_threshold(spent: Callable[[float], int], full_steps: int, lo: float = 1e-4, hi: float = 10.0,
                     rounds: int = 14) -> float:
    """The threshold in [lo, hi] (bisected on a log scale, at most `rounds` runs) at which a threshold policy
    spends `full_steps` full steps, `spent(threshold)` running it once; the closest one tried (the higher of two
    equally close) where none hits it exactly. Full steps fall as the threshold rises."""
    lo, hi, best = math.log(lo), math.log(hi), None
    for _ in range(rounds):
        mid = (lo + hi) / 2
        count = spent(math.exp(mid))
        if best is None or (abs(count - full_steps), -mid) < (abs(best[0] - full_steps), -best[1]):
            best = (count, mid)
        if count == full_steps:
            break
        lo, hi = (mid, hi) if count > full_steps else (lo, mid)
    return math.exp(best[1])


def evaluate_refresh(opts: RefreshStudyOptions = RefreshStudyOptions()) -> list[dict]:
    """Runs the policy study; returns one row per (T, budget, policy, forecast) plus the full-model rows.

    Example:
        >>> rows = evaluate_refresh(RefreshStudyOptions(steps=(10,), intervals=(2,), samples=16))
    """
    study = _Study(opts)
    rows = []
    total = len(opts.steps) * len(opts.intervals) * len(opts.policies) * len(opts.forecast)
    with tqdm(total=total, desc="refresh policies", mininterval=5) as bar:
        for steps in opts.steps:
            full, seconds = study.sample(study.unet, study.noise, steps)
            rows.append({"steps": steps, "policy": "full model", "full_steps": steps, "mac_fraction": 1.0,
                         "seconds": seconds, **study.judge.score(full)})
            recording = record(study.dcs[("pair", False)],
                               lambda: ddim_loop(study.dcs[("pair", False)], {"sample": study.calibration_noise},
                                                 steps, study.scheduler))
            for interval in opts.intervals:
                budget = len(uniform_full_steps(steps, interval))
                threshold = None
                for policy in opts.policies:
                    for forecast in opts.forecast:
                        if policy == "adaptive":
                            dc = study.dcs[("three", forecast)]
                            if threshold is None:
                                threshold = study.tune_threshold(dc, steps, budget, 2 * interval)
                            rows.append(study.row(dc.with_schedule(AdaptiveRefresh(threshold, 2 * interval)), steps,
                                                  interval, policy, forecast, full, threshold=threshold))
                        else:
                            schedule = _schedule(policy, steps, interval, budget, recording)
                            if schedule is not None:
                                dc = study.dcs[("pair", forecast)].with_schedule(schedule)
                                rows.append(study.row(dc, steps, interval, policy, forecast, full))
                        bar.update()  # after the run: the bar counts finished runs
    return [dict(r, samples=opts.samples, seed=opts.seed) for r in rows]


def _schedule(policy: str, steps: int, interval: int, budget: int, recording):
    if policy == "calibrated":
        return recording.plan(full_steps=budget)
    try:
        return make_schedule(policy, interval, num_inference_steps=steps)
    except ValueError:  # no non-uniform schedule with ceil(T/N) full steps for this T
        return None


def _name(row: dict) -> str:
    return row["policy"] + (" + forecast" if row.get("forecast") else "")


def refresh_table(rows: list[dict]) -> str:
    """Markdown: per T and budget, one line per policy (PSNR against the full model, FD, same class, MACs)."""
    lines = ["| DDIM steps | budget (uniform N) | policy | full steps spent | MACs vs full | PSNR dB | FD | "
             "same class |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["policy"] == "full model":
            lines.append(f"| {r['steps']} | | full model | {r['steps']} | 100.0 % | inf | {r['fd']:.2f} | 1 |")
        else:
            lines.append(f"| {r['steps']} | {r['budget']} (N={r['interval']}) | {_name(r)} | {r['full_steps']} | "
                         f"{r['mac_fraction']:.1%} | {r['psnr']:.2f} | {r['fd']:.2f} | {r['agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def write_refresh_results(rows: list[dict], opts: RefreshStudyOptions) -> Path:
    """Writes `refresh.json`, `refresh.md` and `refresh.png` (PSNR and FD against MACs, one line per policy)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refresh.json").write_text(json.dumps({"options": asdict(opts), "rows": rows}, indent=2))
    (out / "refresh.md").write_text(refresh_table(rows))
    _plot(rows, out / "refresh.png")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(steps), 2, figsize=(11, 3.8 * len(steps)), squeeze=False)
    for (ax_psnr, ax_fd), t in zip(axes, steps):
        series: dict[str, list[dict]] = {}
        for r in rows:
            if r["steps"] == t and r["policy"] != "full model":
                series.setdefault(_name(r), []).append(r)
        full = next(r for r in rows if r["steps"] == t and r["policy"] == "full model")
        for name, rs in sorted(series.items()):
            rs.sort(key=lambda r: r["mac_fraction"])
            style = "--" if "forecast" in name else "-"
            x = [100 * r["mac_fraction"] for r in rs]
            ax_psnr.plot(x, [r["psnr"] for r in rs], "o" + style, label=name, ms=4)
            ax_fd.plot(x, [r["fd"] for r in rs], "o" + style, label=name, ms=4)
        ax_fd.axhline(full["fd"], color="k", ls=":", label="full model")
        ax_psnr.set(xlabel="MACs spent (% of the full model)", ylabel="PSNR vs full model (dB)", title=f"DDIM {t} steps")
        ax_fd.set(xlabel="MACs spent (% of the full model)", ylabel="Frechet distance", title=f"DDIM {t} steps")
        ax_psnr.legend(fontsize=7)
        ax_fd.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
