"""One recorded generation -> a `CalibratedPlan`: `DeepCacheUNet.calibrate`'s procedure.

The generation runs through the DeepCacheUNet's own compiled pairs with every step full (its state's
`recording`), so the recorded feature is exactly the tensor DeepCache caches. The step-by-step cosine
similarity of that feature (`refresh.similarity_matrix`, the matrix `analyze` plots) and the budget give the
plan (`refresh.plan_full_steps`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..graph.macs import graph_macs, node_macs
from ..refresh import CalibratedPlan, similarity_matrix
from ..schedule import Calibration, timestep_value

logger = logging.getLogger(__name__)

__all__ = ["calibrate", "Recording", "record"]


@dataclass(frozen=True)
class Recording:
    """One all-full generation's cached features, as a step-by-step similarity.

    Attributes:
        similarity: `(T, T)` mean cosine similarity of the cached feature between steps.
        calibration: the step count, timesteps and sample size of the run.
        branch: the branch whose feature was recorded.
        mac_share: shallow MACs / full MACs at that branch.
    """

    similarity: torch.Tensor
    calibration: Calibration
    branch: int
    mac_share: float

    def plan(self, full_steps: int | None = None, speedup: float | None = None) -> CalibratedPlan:
        """The plan for a budget (`full_steps`, or a MAC `speedup`); many budgets can share one recording."""
        return CalibratedPlan.from_similarity(self.similarity, self.calibration, self.branch, full_steps, speedup,
                                              self.mac_share)


def calibrate(dc, run: Callable[[], Any], full_steps: int | None = None, speedup: float | None = None,
              ) -> CalibratedPlan:
    """See `DeepCacheUNet.calibrate`."""
    plan = record(dc, run).plan(full_steps, speedup)
    logger.info("calibrated plan: %s", plan)
    return plan


def record(dc, run: Callable[[], Any]) -> Recording:
    """Runs `run()` through `dc` with every step full and records its cached feature per step."""
    records: list = []
    with dc._states.generation() as state:
        state.recording = records
        run()
    steps = [r[0] for r in records]
    if not records:
        raise ValueError("the calibration run made no call of this DeepCacheUNet: pass a callable that runs one "
                         "generation through it, e.g. lambda: pipe(prompt, num_inference_steps=50) with "
                         "pipe.unet = dc")
    if steps != sorted(steps) or len({(r[0], r[1]) for r in records}) != len(records):
        raise ValueError("the calibration run ran more than one generation: run exactly one (one pipeline call "
                         "with the step count and resolution the plan is for)")
    total = steps[-1] + 1
    features = [torch.cat([r[4] for r in records if r[0] == step], dim=0) for step in range(total)]
    calibration = Calibration(tuple(timestep_value(r[2]) for r in records if r[1] == 0), records[0][3])
    pair = dc.pairs[-1]
    return Recording(similarity_matrix(features), calibration, pair.branch.index, _mac_share(pair))


def _mac_share(pair) -> float:
    """Shallow MACs / full MACs of the pair's graphs (FlopCounterMode, one run of the traced U-Net)."""
    macs = node_macs(pair.traced.gm, pair.traced.example_inputs)
    return graph_macs(pair.split.shallow, macs) / max(1, sum(macs.values()))
