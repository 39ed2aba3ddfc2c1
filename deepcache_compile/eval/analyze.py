"""Feature similarity across denoising steps (the paper's Figure 2), and a branch/interval suggestion from it.

One full-model DDIM run records every branch's cached tensor (`h_main` at each skip) at every step: the
traced U-Net graph gets one extra output per branch (`probe_graph`), so one run serves all branches. For a
branch, `similarity[i, j]` is the cosine similarity of the step-i and step-j features (per sample, flattened,
then averaged over the batch); `share_above[i]` is the share of other steps whose similarity to step i
exceeds the threshold (0.95, the paper's).

The suggestion rule (`suggest`): a shallow step t reuses the feature of the latest full step f(t). The
*reuse similarity* of (branch b, interval N, uniform schedule) is the 10th percentile over shallow steps of
`similarity_b[t, f(t)]`, higher = fresher (the mean hides the few late steps where features move fast; the
minimum depends on whether the very last step happens to be full). Among the (b, N) whose reuse similarity is
at least 0.997, suggest the one with the largest MAC speedup `T / (F + S * shallow_share_b)`
(`schedule.mac_speedup`). The 0.997 was calibrated on the digits DDPM against its measured quality
(`bench/results/quality/`, README), so that validation is in-sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import fx

from ..api import branch_infos
from ..calls import CallFlattener
from ..graph.branches import find_branches
from ..graph.cuts import Cut
from ..graph.trace import trace_unet
from ..refresh import CalibratedPlan, similarity_matrix
from ..schedule import Calibration, mac_speedup, uniform_full_steps
from .sampling import ddim_loop

__all__ = ["FeatureSimilarity", "Suggestion", "feature_similarity", "probe_graph", "suggest", "plot_similarity"]


def probe_graph(root: fx.GraphModule, branches: tuple[Cut, ...]) -> fx.GraphModule:
    """`(*inputs) -> (sample, *caches)`: the traced U-Net that also returns every branch's cached tensor."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    outputs = graph.graph_copy(root.graph, val_map)
    by_name = {old.name: new for old, new in val_map.items()}
    graph.output((*outputs, *(by_name[b.streams[0].node] for b in branches)))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="DeepCacheProbe")


@dataclass(frozen=True)
class FeatureSimilarity:
    """Step-by-step similarity of each branch's cached feature over one full-model run.

    Attributes:
        timesteps: the scheduler's timesteps, one per step.
        similarity: `{branch: (T, T) tensor}` of mean cosine similarities.
        mac_share: `{branch: shallow MACs / full MACs}`.
        threshold: the similarity counted as "close" (0.95).
    """

    timesteps: tuple[int, ...]
    similarity: dict[int, torch.Tensor]
    mac_share: dict[int, float]
    threshold: float = 0.95
    size: tuple[int, int] | None = None

    def plan(self, branch: int, full_steps: int) -> CalibratedPlan:
        """The calibrated plan of `full_steps` full steps for `branch` from this run (`refresh.plan_full_steps`),
        with its predicted drift next to that of evenly spaced full steps."""
        calibration = Calibration(self.timesteps, self.size)
        return CalibratedPlan.from_similarity(self.similarity[branch], calibration, branch, full_steps=full_steps,
                                              mac_share=self.mac_share[branch])

    def share_above(self, branch: int) -> torch.Tensor:
        """Per step, the share of the other steps whose feature similarity exceeds the threshold."""
        sim = self.similarity[branch]
        steps = len(sim)
        above = (sim > self.threshold).float().sum(1) - 1  # not the step itself
        return above / max(1, steps - 1)

    def reuse_similarity(self, branch: int, interval: int, quantile: float = 0.1) -> float:
        """A low quantile of the similarity between each shallow step's own feature and the cached one it uses
        (uniform 1:N); 1.0 when no step is shallow."""
        sim, steps = self.similarity[branch], len(self.similarity[branch])
        full = set(uniform_full_steps(steps, interval))
        last, values = 0, []
        for t in range(steps):
            if t in full:
                last = t
            else:
                values.append(sim[t, last].item())
        return torch.quantile(torch.tensor(values), quantile).item() if values else 1.0


def feature_similarity(unet, call: dict, steps: int, scheduler=None, threshold: float = 0.95) -> FeatureSimilarity:
    """Runs `steps` full-model DDIM steps from `call` and measures every branch's feature similarity.

    Args:
        unet: a diffusers U-Net.
        call: keyword arguments of one U-Net call; `sample` is the initial noise, `timestep` is ignored.
        steps: DDIM steps.
        scheduler: its config gives the noise schedule (default: Stable Diffusion's).

    Example:
        >>> sim = feature_similarity(unet, {"sample": torch.randn(8, 1, 16, 16)}, steps=50, scheduler=scheduler)
        >>> sim.reuse_similarity(branch=2, interval=5)
    """
    flatten = CallFlattener(unet)
    traced = trace_unet(unet, flatten((), dict(call, timestep=torch.tensor(999))))
    branches = find_branches(traced.gm)
    probe = probe_graph(traced.gm, branches)
    records: list[tuple[torch.Tensor, ...]] = []
    timesteps: list[int] = []

    def model(sample, timestep, **kwargs):
        out, *caches = probe(*flatten((sample, timestep), kwargs).tensors)
        records.append(tuple(c.flatten(1).float() for c in caches))
        timesteps.append(int(timestep))
        return SimpleNamespace(sample=out)

    ddim_loop(model, call, steps, scheduler)
    shares = {b.index: b.mac_share for b in branch_infos(traced)}
    similarity = {b.index: similarity_matrix([r[b.index] for r in records]) for b in branches}
    return FeatureSimilarity(tuple(timesteps), similarity, shares, threshold, tuple(call["sample"].shape[-2:]))


@dataclass(frozen=True)
class Suggestion:
    branch: int
    interval: int
    reuse_similarity: float
    mac_speedup: float

    def __str__(self) -> str:
        return (f"branch={self.branch}, interval={self.interval}: 90 % of shallow steps see cosine similarity >= "
                f"{self.reuse_similarity:.4f} to the cached feature, {self.mac_speedup:.2f}x fewer MACs "
                "(uniform schedule)")


def candidates(sim: FeatureSimilarity, intervals: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10)) -> list[Suggestion]:
    """Every (branch, interval) with its reuse similarity and MAC speedup."""
    steps = len(sim.timesteps)
    return [Suggestion(b, n, sim.reuse_similarity(b, n), mac_speedup(steps, len(uniform_full_steps(steps, n)), share))
            for b, share in sim.mac_share.items() for n in intervals]


SUGGEST_THRESHOLD = 0.997


def suggest(sim: FeatureSimilarity, intervals: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10),
            threshold: float = SUGGEST_THRESHOLD) -> Suggestion:
    """The fastest (branch, interval) whose reuse similarity is at least `threshold`.

    Raises:
        ValueError: no branch keeps its features above the threshold even at the smallest interval.
    """
    ok = [c for c in candidates(sim, intervals) if c.reuse_similarity >= threshold]
    if not ok:
        raise ValueError(f"no branch keeps its cached feature above cosine similarity {threshold} between steps: "
                         "DeepCache will cost quality on this model; lower the threshold or use more steps")
    return max(ok, key=lambda c: (c.mac_speedup, -c.branch))


def plot_similarity(sim: FeatureSimilarity, branches: tuple[int, ...], path: Path) -> None:
    """Heatmaps of the step-by-step similarity per branch, and the share of steps above the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(branches) + 1, figsize=(3.6 * (len(branches) + 1), 3.4))
    for ax, b in zip(axes, branches):
        image = ax.imshow(sim.similarity[b].numpy(), vmin=min(0.5, sim.similarity[b].min().item()), vmax=1,
                          cmap="viridis")
        ax.set(title=f"branch {b} (shallow {sim.mac_share[b]:.0%} MACs)", xlabel="step", ylabel="step")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for b in branches:
        axes[-1].plot(sim.share_above(b).numpy() * 100, label=f"branch {b}")
    axes[-1].set(title=f"steps with similarity > {sim.threshold}", xlabel="step", ylabel="% of other steps",
                 ylim=(0, 100))
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_analysis(sim: FeatureSimilarity, path: Path, branches: tuple[int, ...]) -> dict:
    """Writes the PNG and a JSON beside it (similarities, shares, candidates, suggestion); returns the JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_similarity(sim, branches, path)
    try:
        pick = suggest(sim)
        suggestion = {"branch": pick.branch, "interval": pick.interval, "text": str(pick)}
    except ValueError as err:
        suggestion = {"error": str(err)}
    record = {"timesteps": sim.timesteps, "threshold": sim.threshold, "mac_share": sim.mac_share,
              "similarity": {b: s.double().round(decimals=5).tolist() for b, s in sim.similarity.items()},
              "share_above": {b: sim.share_above(b).tolist() for b in sim.similarity},
              "candidates": [c.__dict__ for c in candidates(sim)], "suggestion": suggestion}
    path.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record
