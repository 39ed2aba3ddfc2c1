"""Block caches on the trained digits DiT, ours against diffusers' own hooks, at matched budgets:
`deepcache-compile quality --transformer`.

Every method samples the same noise and class labels as the full model (DDIM, eta 0: samples are paired) and is
scored as in `quality` (PSNR against the full model, FD, same class), plus `label accuracy` (the classifier
agrees with the class the DiT was asked for) and the transformer FLOPs it actually spent, counted by
`FlopCounterMode` over the whole generation (so every method is charged for what it ran, hooks and graphs
alike). For each budget (the full steps uniform N spends at T steps):

- ours (`compile_deepcache`, eager graphs, cut 0: block 0 computed on cached steps):
  `uniform` (1:N), `uniform + forecast` (the cached residual extrapolated, first order), `calibrated` (the plan
  with the least recorded residual drift, calibrated on other noise), `first-block` (`FirstBlockRefresh`, the
  threshold tuned on the calibration batch to spend the budget), `adaptive` (`AdaptiveRefresh`: drift
  accumulated since the last full step, tuned the same way);
- diffusers' hooks on the same model: `diffusers FirstBlockCache` (`apply_first_block_cache`, the same tuned
  threshold as ours: the decisions are the same rule), `diffusers TaylorSeer` on whole blocks (every block's
  output predicted by a Taylor series between full steps every N, orders 1 and 2; its first 3 steps full, its
  default), `diffusers TaylorSeer attention` (the attention outputs only, as its default intends: its default
  patterns (`^transformer_blocks.*attn`, matched whole) miss DiT's `attn1`, so they are given) and
  `diffusers TaylorSeer lite` (its lite mode: blocks skipped, the output projection predicted).

The full model's FD over three noise seeds gives the spread the FD targets are read against.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..api import compile_deepcache
from ..refresh import AdaptiveRefresh, FirstBlockRefresh
from ..runtime.calibrate import record
from ..schedule import Schedule, uniform_full_steps
from .digits import ASSETS, DIT_ASSETS, digit_labels, load_digits_dit
from .quality import Judge
from .refresh_study import bisect_threshold
from .sampling import ddim_loop, timed

__all__ = ["TransformerStudyOptions", "METHODS", "evaluate_transformer_caches", "transformer_table",
           "write_transformer_results"]

METHODS = ("uniform", "uniform + forecast", "calibrated", "first-block", "adaptive", "diffusers FirstBlockCache",
           "diffusers TaylorSeer blocks o1", "diffusers TaylorSeer blocks o2", "diffusers TaylorSeer attention",
           "diffusers TaylorSeer lite")


@dataclass(frozen=True)
class TransformerStudyOptions:
    steps: int = 50
    intervals: tuple[int, ...] = (2, 3, 5, 8, 12)
    samples: int = 500
    calibration_samples: int = 32
    seed: int = 0
    fd_seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    out: str = "out/transformer"  # ignored by git; records pass --out bench/results/transformer
    assets: str = str(DIT_ASSETS)
    judge_assets: str = str(ASSETS)  # the classifier (the DDPM's)


def per_row_timestep(model: Callable) -> Callable:
    """`model(x, t, **kw)` with a 0-d `t` as the batch of timesteps DiT takes (as `DiTPipeline` passes it)."""
    return lambda x, t, **kw: model(x, t.expand(x.shape[0]), **kw)


class _Hooked:
    """A copy of the DiT with one of diffusers' cache hooks, run as its pipelines run it (cache context "cond"
    around each call, hook state reset after each generation); counts the steps its first-block hook computed."""

    def __init__(self, model: torch.nn.Module, apply: Callable[[torch.nn.Module], None]):
        self.model = copy.deepcopy(model)
        apply(self.model)
        self.history = ""

    def __call__(self, x, t, **kw):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.model, CacheContext("cond"))
        try:
            out = self.model(x, t, **kw)
            leader = getattr(self.model.transformer_blocks[0], "_diffusers_hook", None)
            hook = leader.get_hook("fbc_leader_block_hook") if leader is not None else None
            if hook is not None:
                self.history += "F" if hook.state_manager.get_state().should_compute else "S"
        finally:
            _set_cache_context(self.model, None)
        return out

    def reset(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()
        self.history = ""


class _Study:
    def __init__(self, opts: TransformerStudyOptions):
        self.opts = opts
        self.model, self.scheduler = load_digits_dit(Path(opts.assets))
        self.judge = Judge(Path(opts.judge_assets))
        self.noise = self._noise(opts.samples, opts.seed)
        self.labels = digit_labels(opts.samples)
        self.calibration_noise = self._noise(opts.calibration_samples, opts.seed + 100)
        self.calibration_labels = digit_labels(opts.calibration_samples)
        self.blocks = len(self.model.transformer_blocks)
        self.dcs = {(split, forecast): compile_deepcache(self.model, branch=0, split=split, forecast=forecast)
                    for split, forecast in (("pair", False), ("pair", True), ("three", False))}
        for dc in self.dcs.values():  # trace now: FlopCounterMode would count a trace inside a counted run
            for noise, labels in ((self.noise, self.labels), (self.calibration_noise, self.calibration_labels)):
                dc.prepare(noise, torch.full((len(noise),), 999), class_labels=labels)

    @staticmethod
    def _noise(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))

    def sample(self, model, noise: torch.Tensor, labels: torch.Tensor, count: bool = False
               ) -> tuple[torch.Tensor, float, int]:
        """Images, seconds and (with `count`) the transformer FLOPs of one generation."""
        run = lambda: ddim_loop(per_row_timestep(model), {"sample": noise, "class_labels": labels},  # noqa: E731
                                self.opts.steps, self.scheduler)
        if not count:
            images, seconds = timed(run)
            return images.clamp(-1, 1), seconds, 0
        with FlopCounterMode(display=False) as counter:
            images, seconds = timed(run)
        return images.clamp(-1, 1), seconds, counter.get_total_flops()

    def tune(self, make: Callable[[float], object], full_steps: int) -> float:
        """The threshold whose policy spends `full_steps` full steps on the calibration batch (closest)."""
        def spent(threshold: float) -> int:
            dc = self.dcs[("three", False)].with_schedule(make(threshold))
            self.sample(dc, self.calibration_noise, self.calibration_labels)
            return dc.history.count("F")

        return bisect_threshold(spent, full_steps)


def _taylorseer(interval: int, order: int, modules: str) -> Callable[[torch.nn.Module], None]:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    patterns = {"blocks": [r"transformer_blocks\.\d+"], "attention": [r"transformer_blocks\.\d+\.attn1"], "lite": None}
    config = TaylorSeerCacheConfig(cache_interval=interval, max_order=order, taylor_factors_dtype=torch.float32,
                                   cache_identifiers=patterns[modules], use_lite_mode=modules == "lite")
    return lambda model: apply_taylorseer_cache(model, config)


def _first_block_cache(threshold: float) -> Callable[[torch.nn.Module], None]:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return lambda model: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))


def evaluate_transformer_caches(opts: TransformerStudyOptions = TransformerStudyOptions()) -> list[dict]:
    """Runs the comparison; returns the full-model rows (one per FD seed) and one row per (budget, method).

    Example:
        >>> rows = evaluate_transformer_caches(TransformerStudyOptions(steps=10, intervals=(2,), samples=16))
    """
    study = _Study(opts)
    unknown = set(opts.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {METHODS}")
    rows = []
    full, seconds, full_flops = study.sample(study.model, study.noise, study.labels, count=True)
    for seed in opts.fd_seeds:
        images = full if seed == opts.seed else study.sample(study.model, study._noise(opts.samples, seed),
                                                             study.labels)[0]
        rows.append({"method": "full model", "fd_seed": seed, "full_steps": opts.steps, "flop_fraction": 1.0,
                     "seconds": seconds if seed == opts.seed else None, **_scores(study, images, None)})
    recording = record(study.dcs[("pair", False)], lambda: study.sample(
        study.dcs[("pair", False)], study.calibration_noise, study.calibration_labels))
    with tqdm(total=len(opts.intervals) * len(opts.methods), desc="transformer caches", mininterval=5) as bar:
        for interval in opts.intervals:
            budget = len(uniform_full_steps(opts.steps, interval))
            thresholds: dict[str, float] = {}
            for method in opts.methods:
                model, extra = _method(study, method, interval, budget, recording, thresholds)
                if isinstance(model, _Hooked):
                    model.reset()
                images, seconds, flops = study.sample(model, study.noise, study.labels, count=True)
                history = getattr(model, "history", "")
                rows.append({"method": method, "interval": interval, "budget": budget,
                             "full_steps": history.count("F") if history else None,
                             "flop_fraction": flops / full_flops, "seconds": seconds, **extra,
                             **_scores(study, images, full)})
                bar.update()
    return [dict(r, samples=opts.samples, steps=opts.steps, seed=opts.seed) for r in rows]


def _method(study: _Study, method: str, interval: int, budget: int, recording, thresholds: dict):
    """The model (a DeepCacheUNet or a hooked copy) that runs `method` at this budget, and what to record."""
    if method == "uniform":
        return study.dcs[("pair", False)].with_schedule(Schedule("uniform", interval=interval)), {}
    if method == "uniform + forecast":
        return study.dcs[("pair", True)].with_schedule(Schedule("uniform", interval=interval)), {}
    if method == "calibrated":
        return study.dcs[("pair", False)].with_schedule(recording.plan(full_steps=budget)), {}
    if method in ("first-block", "diffusers FirstBlockCache"):
        if "first-block" not in thresholds:
            thresholds["first-block"] = study.tune(lambda t: FirstBlockRefresh(t), budget)
        threshold = thresholds["first-block"]
        if method == "first-block":
            return study.dcs[("three", False)].with_schedule(FirstBlockRefresh(threshold)), {"threshold": threshold}
        return _Hooked(study.model, _first_block_cache(threshold)), {"threshold": threshold}
    if method == "adaptive":
        threshold = study.tune(lambda t: AdaptiveRefresh(t, max_skip=2 * interval), budget)
        return study.dcs[("three", False)].with_schedule(AdaptiveRefresh(threshold, 2 * interval)), \
            {"threshold": threshold}
    order = 2 if method.endswith("o2") else 1
    modules = next(m for m in ("blocks", "attention", "lite") if m in method)
    return _Hooked(study.model, _taylorseer(interval, order, modules)), {}


def _scores(study: _Study, images: torch.Tensor, full: torch.Tensor | None) -> dict:
    row = study.judge.score(images, full)
    row["label_accuracy"] = (study.judge.probabilities(images).argmax(1) == study.labels).float().mean().item()
    return row


def transformer_table(rows: list[dict]) -> str:
    """Markdown: the full model per FD seed, then per budget one line per method."""
    lines = ["| budget (uniform N) | method | full steps | FLOPs vs full | PSNR dB | FD | same class | label acc. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["method"] == "full model":
            lines.append(f"| | full model (noise seed {r['fd_seed']}) | {r['full_steps']} | 100 % | | {r['fd']:.2f} | "
                         f"| {r['label_accuracy']:.3f} |")
        else:
            spent = "" if r["full_steps"] is None else r["full_steps"]
            lines.append(f"| {r['budget']} (N={r['interval']}) | {r['method']} | {spent} | {r['flop_fraction']:.1%} | "
                         f"{r['psnr']:.2f} | {r['fd']:.2f} | {r['agreement']:.3f} | {r['label_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def write_transformer_results(rows: list[dict], opts: TransformerStudyOptions) -> Path:
    """Writes `transformer.json`, `transformer.md` and `transformer.png` (PSNR and FD against FLOPs)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer.json").write_text(json.dumps({"options": asdict(opts), "rows": rows}, indent=2))
    (out / "transformer.md").write_text(transformer_table(rows))
    _plot(rows, out / "transformer.png")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_psnr, ax_fd) = plt.subplots(1, 2, figsize=(12, 4.2))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "full model":
            series.setdefault(r["method"], []).append(r)
    for name, rs in series.items():
        rs.sort(key=lambda r: r["flop_fraction"])
        style = "s--" if name.startswith("diffusers") else "o-"
        x = [100 * r["flop_fraction"] for r in rs]
        ax_psnr.plot(x, [r["psnr"] for r in rs], style, label=name, ms=4)
        ax_fd.plot(x, [r["fd"] for r in rs], style, label=name, ms=4)
    fds = [r["fd"] for r in rows if r["method"] == "full model"]
    ax_fd.axhspan(min(fds), max(fds), color="k", alpha=0.15, label="full model, 3 noise seeds")
    ax_psnr.axhline(30, color="k", ls=":", lw=0.8)
    ax_psnr.set(xlabel="transformer FLOPs spent (% of the full model)", ylabel="PSNR vs full model (dB)",
                title="digits DiT, DDIM 50 steps")
    ax_fd.set(xlabel="transformer FLOPs spent (% of the full model)", ylabel="Frechet distance (log scale)", title="FD",
              yscale="log")
    ax_psnr.legend(fontsize=7)
    ax_fd.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
