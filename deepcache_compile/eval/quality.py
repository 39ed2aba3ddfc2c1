"""What DeepCache costs in image quality, measured on the trained digits DDPM (the paper's Tables 2 and 4).

For each DDIM step count T, the full model and DeepCache at every (branch, interval N, schedule) sample from
the same initial noise (DDIM with eta = 0 is deterministic, so samples are paired by seed). Per configuration:
- `fd`: Frechet distance between generated and real digits in the 128-d feature space of the shipped digit
  classifier (an FID for digits; see `digits.DigitClassifier`). Reference points: real vs real and noise vs real;
- `confidence`: the classifier's mean top-class probability on the samples;
- `agreement`: share of samples the classifier puts in the same class as the full model's sample from the
  same noise (an accuracy with the full model as the label);
- `mse` / `psnr`: pixel error against the full model's samples (images in [0, 1], PSNR = 10 log10(1 / MSE)
  over all pixels);
- `mac_speedup`: T full steps over (F full + S shallow) steps in MACs (FlopCounterMode), and `seconds`, the
  measured sampling time of that run (runs are sequential, so noisier than `bench/`'s interleaved timings).
The same-throughput comparison (Table 4) runs plain DDIM with k = round(T / mac_speedup) steps next to each
DeepCache row: the step count that costs the same MACs.

With `dtype="bf16"` (or "fp16") the full model and DeepCache run in that precision (weights, latents and the
scheduler's arithmetic, as a pipeline in that dtype runs them) and are scored against the fp32 full model from
the same noise: the rows "DDIM T bf16" (kind "full-lowp") give the cost of the precision alone, the DeepCache
rows the cost of both. `dtype="int8"` quantizes the fp32 model (`precision.Int8`, calibrated on one generation
from other noise); its "full-lowp" row is the int8 model with every step full. `backend` compiles the DeepCache rows with another backend than the eager reference
(e.g. "inductor", whose bf16 attention runs on the project's kernel, or "inductor:attention='sdpa'"): what a
compiler changes in the images is measured the same way.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..api import compile_deepcache, list_branches
from ..precision import Int8, record_calls
from ..schedule import Schedule, make_schedule
from .benchmark import PRECISIONS, parse_backend, precision_dtype
from .digits import ASSETS, digit_images, load_classifier, load_digits_model
from .sampling import ddim_loop, timed

__all__ = ["Judge", "QualityOptions", "frechet_distance", "evaluate_quality", "quality_table", "summary_table",
           "save_grid", "psnr", "write_results"]


@dataclass(frozen=True)
class QualityOptions:
    steps: tuple[int, ...] = (100, 50)
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    branches: tuple[int, ...] = (0, 2)
    schedules: tuple[str, ...] = ("uniform", "nonuniform")
    samples: int = 500
    seed: int = 0
    always_full_last: int = 0  # the last this-many steps are full (all schedules)
    out: str = "out/quality"  # ignored by git; records pass --out bench/results/quality
    assets: str = str(ASSETS)  # the trained model and classifier (digits.save_assets)
    dtype: str = "fp32"  # the precision DeepCache (and a full-model row) run in; the reference stays fp32
    backend: str = "eager"  # the DeepCache rows' backend, with options: "inductor:attention='sdpa'"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `(n, d)` (the FID formula).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(1000, 8))
        >>> round(frechet_distance(x, x), 6)
        0.0
    """
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # singular product: regularize as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


def psnr(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(MSE, PSNR in dB) of images in [-1, 1], measured in [0, 1] units over all pixels."""
    mse = ((images - reference) / 2).pow(2).mean().item()
    return mse, (10 * math.log10(1 / mse) if mse > 0 else math.inf)


class Judge:
    """Classifier features and predictions for generated digits, against the real digits' features."""

    def __init__(self, assets: Path = ASSETS):
        self.classifier = load_classifier(assets)
        real, _ = digit_images()
        self.real = self.features(real)

    def fd(self, images: torch.Tensor) -> float:
        """Frechet distance of generated digits to all real digits."""
        return frechet_distance(self.features(images), self.real)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images.clamp(-1, 1)).double().numpy()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.clamp(-1, 1)).softmax(1)

    def score(self, images: torch.Tensor, full: torch.Tensor | None = None) -> dict:
        """FD and confidence of `images`; with the full model's samples from the same noise, also MSE, PSNR and
        `agreement` (the share classified as the same digit as the full model's sample)."""
        probs = self.probabilities(images)
        row = {"fd": self.fd(images), "confidence": probs.max(1).values.mean().item()}
        if full is not None:
            row["mse"], row["psnr"] = psnr(images, full)
            row["agreement"] = (probs.argmax(1) == self.probabilities(full).argmax(1)).float().mean().item()
        return row

    def reference_rows(self, n: int, seed: int) -> list[dict]:
        """FD of real digits (n held apart vs the rest) and of Gaussian noise: the floor and the ceiling."""
        order = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed)).numpy()
        noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
        return [{"name": f"real digits ({n} vs other {len(order) - n})",
                 "fd": frechet_distance(self.real[order[:n]], self.real[order[n:]])},
                {"name": "Gaussian noise", "fd": frechet_distance(self.features(noise), self.real)}]


def _sample(model, scheduler, noise: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, float]:
    images, seconds = timed(lambda: ddim_loop(model, {"sample": noise.to(dtype)}, steps, scheduler))
    return images.float().clamp(-1, 1), seconds


class _Evaluation:
    """The model, the judge, the shared noise, one DeepCacheUNet per branch and the plain-DDIM runs so far."""

    def __init__(self, opts: QualityOptions):
        if opts.dtype not in PRECISIONS:
            raise ValueError(f"dtype={opts.dtype!r} is unknown: choose one of {PRECISIONS}")
        self.unet, self.scheduler = load_digits_model(Path(opts.assets))
        self.dtype = precision_dtype(opts.dtype)
        self.dtype_name = opts.dtype
        self.model = self.unet if self.dtype == torch.float32 else copy.deepcopy(self.unet).to(self.dtype)
        self.judge = Judge(Path(opts.assets))
        self.noise = torch.randn(opts.samples, 1, 16, 16, generator=torch.Generator().manual_seed(opts.seed))
        self.shares = {b.index: b.mac_share for b in list_branches(self.unet, self.noise[:1], 0)}
        backend, options = parse_backend(opts.backend)
        self.backend = opts.backend
        # int8: calibrated on one generation from other noise (same batch: int8 pairs are per input signature).
        self.int8 = None if opts.dtype != "int8" else Int8(record_calls(self.unet, lambda: ddim_loop(
            self.unet, {"sample": torch.randn(self.noise.shape, generator=torch.Generator().manual_seed(opts.seed + 1))},
            min(opts.steps), self.scheduler)))
        self.compiled = {b: compile_deepcache(self.model, branch=b, backend=backend, backend_options=options,
                                              quantize=self.int8) for b in opts.branches}
        for dc in self.compiled.values():
            dc.prepare(self.noise.to(self.dtype), torch.tensor(999))  # trace now, not inside a timed run
        self._plain: dict[tuple[int, bool], tuple[torch.Tensor, float]] = {}
        self.always_full_last = opts.always_full_last

    def plain(self, steps: int, low_precision: bool = False) -> tuple[torch.Tensor, float]:
        """The full model's samples and sampling time at `steps` DDIM steps, in fp32 or in the run's dtype
        (each run once)."""
        if (steps, low_precision) not in self._plain:
            model, dtype = (self.model, self.dtype) if low_precision else (self.unet, torch.float32)
            if low_precision and self.int8 is not None:  # the int8 model: every step full
                model = next(iter(self.compiled.values())).with_schedule(Schedule("uniform", interval=1))
            self._plain[steps, low_precision] = _sample(model, self.scheduler, self.noise, steps, dtype)
        return self._plain[steps, low_precision]

    def full_rows(self, steps: int) -> list[dict]:
        """The fp32 full model; in a reduced-precision run also the full model in that precision, scored against
        the fp32 one."""
        images, seconds = self.plain(steps)
        rows = [{"name": f"DDIM {steps}", "kind": "full", "steps": steps, "interval": 1, "mac_speedup": 1.0,
                 "seconds": seconds, "dtype": "fp32", **self.judge.score(images)}]
        if self.dtype_name != "fp32":
            low, seconds = self.plain(steps, low_precision=True)
            rows.append({"name": f"DDIM {steps} {self.dtype_name}", "kind": "full-lowp", "steps": steps,
                         "interval": 1, "mac_speedup": 1.0, "seconds": seconds, "dtype": self.dtype_name,
                         **self.judge.score(low, images)})
        return rows

    def deepcache_row(self, steps: int, branch: int, interval: int, kind: str) -> dict | None:
        """DeepCache at (branch, N, schedule) and plain DDIM at the same MACs, scored against the full model."""
        try:
            schedule = make_schedule(kind, interval, num_inference_steps=steps, always_full_last=self.always_full_last)
        except ValueError:  # no non-uniform schedule with ceil(T/N) full steps for this T
            return None
        dc = self.compiled[branch].with_schedule(schedule)
        n_full = len(dc.full_steps(steps))
        mac_speedup = schedule.mac_speedup(steps, self.shares[branch])
        low = self.dtype_name != "fp32"
        images, seconds = _sample(dc, self.scheduler, self.noise, steps, self.dtype)
        matched = max(1, round(steps / mac_speedup))
        matched_images, matched_seconds = self.plain(matched, low_precision=low)
        full = self.plain(steps)[0]
        last = f" +{self.always_full_last} full last" if self.always_full_last else ""
        precision = f" {self.dtype_name}" if low else ""
        compiler = f" {self.backend}" if self.backend != "eager" else ""
        return {"name": f"DeepCache{compiler}{precision} {kind}{last} N={interval} b={branch}", "kind": "deepcache",
                "dtype": self.dtype_name, "backend": self.backend, "steps": steps,
                "branch": branch, "interval": interval, "schedule": kind, "always_full_last": self.always_full_last,
                "full_steps": n_full,
                "shallow_mac_share": self.shares[branch], "mac_speedup": mac_speedup, "seconds": seconds,
                **self.judge.score(images, full), "matched_steps": matched, "matched_seconds": matched_seconds,
                **{f"matched_{k}": v for k, v in self.judge.score(matched_images, full).items()}}


def evaluate_quality(opts: QualityOptions = QualityOptions()) -> list[dict]:
    """Runs the evaluation grid on the trained digits model in `opts.assets`; returns one row per run.

    Example:
        >>> rows = evaluate_quality(QualityOptions(steps=(10,), intervals=(2,), branches=(0,), samples=16))
    """
    run = _Evaluation(opts)
    rows = [dict(r, kind="reference") for r in run.judge.reference_rows(opts.samples, opts.seed)]
    grid = [(b, n, s) for b in opts.branches for n in opts.intervals for s in opts.schedules]
    with tqdm(total=len(opts.steps) * (1 + len(grid)), desc="quality", mininterval=5) as bar:
        for steps in opts.steps:
            rows += run.full_rows(steps)
            bar.update()
            for branch, interval, kind in grid:
                row = run.deepcache_row(steps, branch, interval, kind)
                rows += [row] if row else []
                bar.update()
    return [dict(r, samples=opts.samples, seed=opts.seed) for r in rows]


def quality_table(rows: list[dict]) -> str:
    """A Markdown table like the paper's Table 2, with the Table 4 comparison (plain DDIM at equal MACs)."""
    lines = ["| steps | configuration | full steps | MAC speedup | measured s | FD | confidence | agreement | "
             "PSNR dB | same-MACs DDIM: steps, FD, PSNR dB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kind"] == "reference":
            lines.append(f"| | {r['name']} | | | | {r['fd']:.2f} | | | | |")
        elif r["kind"] == "full":
            lines.append(f"| {r['steps']} | {r['name']} (full model) | {r['steps']} | 1.00x | {r['seconds']:.1f} | "
                         f"{r['fd']:.2f} | {r['confidence']:.3f} | 1 | inf | |")
        elif r["kind"] == "full-lowp":
            lines.append(f"| {r['steps']} | {r['name']} (full model) | {r['steps']} | 1.00x | {r['seconds']:.1f} | "
                         f"{r['fd']:.2f} | {r['confidence']:.3f} | {r['agreement']:.3f} | {r['psnr']:.1f} | |")
        else:
            lines.append(
                f"| {r['steps']} | {r['name']} | {r['full_steps']} | {r['mac_speedup']:.2f}x | {r['seconds']:.1f} | "
                f"{r['fd']:.2f} | {r['confidence']:.3f} | {r['agreement']:.3f} | {r['psnr']:.1f} | "
                f"{r['matched_steps']}, {r['matched_fd']:.2f}, {r['matched_psnr']:.1f} |")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None, key: str, spec: str) -> str:
    return format(row[key], spec) if row else "n/a"


def summary_table(rows: list[dict]) -> str:
    """The paper's Table 2 layout: per step count and branch, one line per N with both schedules side by side,
    and the plain-DDIM run with the same MACs as the uniform schedule (Table 4)."""
    lines = ["| DDIM steps | branch | N | MAC speedup (uniform) | FD uniform | FD non-uniform | PSNR dB uniform | "
             "PSNR dB non-uniform | same MACs: plain DDIM steps, FD |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cached = [r for r in rows if r["kind"] == "deepcache"]
    for steps in sorted({r["steps"] for r in cached}, reverse=True):
        full = next(r for r in rows if r["kind"] == "full" and r["steps"] == steps)
        lines.append(f"| {steps} | full model | 1 | 1.00x | {full['fd']:.2f} | | | | |")
        for low in (r for r in rows if r["kind"] == "full-lowp" and r["steps"] == steps):
            lines.append(f"| {steps} | full model {low['dtype']} | 1 | 1.00x | {low['fd']:.2f} | | {low['psnr']:.1f} | | |")
        for branch in sorted({r["branch"] for r in cached}):
            for n in sorted({r["interval"] for r in cached}):
                pick = {r["schedule"]: r for r in cached if (r["steps"], r["branch"], r["interval"]) == (steps, branch, n)}
                u, nu = pick.get("uniform"), pick.get("nonuniform")
                if u is None:
                    continue
                lines.append(f"| {steps} | {branch} | {n} | {u['mac_speedup']:.2f}x | {u['fd']:.2f} | {_cell(nu, 'fd', '.2f')} | "
                             f"{u['psnr']:.1f} | {_cell(nu, 'psnr', '.1f')} | {u['matched_steps']}, {u['matched_fd']:.2f} |")
    return "\n".join(lines) + "\n"


def save_grid(images: torch.Tensor, path: Path, columns: int = 16, scale: int = 4) -> None:
    """Writes `(n, 1, h, w)` images in [-1, 1] as one PNG grid, each pixel `scale`x`scale`."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 0.5)
    for i, image in enumerate(images[:, 0]):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = (image.clamp(-1, 1) + 1) / 2
    pixels = (canvas * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").resize((pixels.shape[1] * scale, pixels.shape[0] * scale),
                                             Image.NEAREST).save(path)


def write_results(rows: list[dict], opts: QualityOptions) -> Path:
    """Writes `quality.json`, `quality.md` (summary, then every row) and `quality.png` (FD and PSNR against N) under `opts.out`."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"options": asdict(opts), "rows": rows}, indent=2))
    (out / "quality.md").write_text(summary_table(rows) + "\n" + quality_table(rows))
    _plot(rows, out / "quality.png")
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["steps"] for r in rows if r["kind"] == "deepcache"}, reverse=True)
    fig, axes = plt.subplots(len(steps), 2, figsize=(10, 3.6 * len(steps)), squeeze=False)
    for (ax_fd, ax_psnr), t in zip(axes, steps):
        full = next(r for r in rows if r["kind"] == "full" and r["steps"] == t)
        ax_fd.axhline(full["fd"], color="k", ls="--", label=f"full DDIM {t}")
        series = {}
        for r in rows:
            if r["kind"] == "deepcache" and r["steps"] == t:
                series.setdefault((r["branch"], r["schedule"]), []).append(r)
        for (branch, kind), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["interval"])
            style = "o-" if kind == "uniform" else "s--"
            n = [r["interval"] for r in rs]
            ax_fd.plot(n, [r["fd"] for r in rs], style, label=f"b={branch} {kind}")
            ax_psnr.plot(n, [r["psnr"] for r in rs], style, label=f"b={branch} {kind}")
        matched = sorted({(r["interval"], r["matched_fd"]) for r in rows if r["kind"] == "deepcache" and r["steps"] == t
                          and r["schedule"] == "uniform" and r["branch"] == min(b for b, _ in series)})
        ax_fd.plot([m[0] for m in matched], [m[1] for m in matched], "k:", label="plain DDIM, same MACs as lowest b")
        ax_fd.set(xlabel="interval N", ylabel="Frechet distance (classifier features)", title=f"DDIM {t} steps")
        ax_psnr.set(xlabel="interval N", ylabel="PSNR vs full model (dB)", title=f"DDIM {t} steps")
        ax_fd.legend(fontsize=7)
        ax_psnr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
