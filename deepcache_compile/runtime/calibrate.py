"""One recorded generation -> a `CalibratedPlan`: `DeepCacheUNet.calibrate`'s procedure.

The generation runs through the DeepCacheUNet's own compiled pairs with every step full (its state's
`recording`), so the recorded feature is exactly the tensor DeepCache caches. The step-by-step cosine
similarity of that feature (`refresh.similarity_matrix`, the matrix `analyze` plots) and the budget give the
plan (`refresh.plan_full_steps`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..graph.macs import graph_macs, node_macs
from ..refresh import CalibratedPlan, similarity_matrix
from ..schedule import Calibration

logger = logging.getLogger(__name__)

__all__ = ["calibrate"]


def calibrate(dc, run: Callable[[], Any], full_steps: int | None = None, speedup: float | None = None,
              ) -> CalibratedPlan:
    """See `DeepCacheUNet.calibrate`."""
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
    calibration = Calibration(tuple(_value(r[2]) for r in records if r[1] == 0), records[0][3])
    pair = dc.pairs[-1]
    plan = CalibratedPlan.from_similarity(similarity_matrix(features), calibration, pair.branch.index,
                                          full_steps, speedup, _mac_share(pair))
    logger.info("calibrated plan: %s", plan)
    return plan


def _value(timestep) -> float:
    return float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


def _mac_share(pair) -> float:
    """Shallow MACs / full MACs of the pair's graphs (FlopCounterMode, one run of the traced U-Net)."""
    macs = node_macs(pair.traced.gm, pair.traced.example_inputs)
    return graph_macs(pair.split.shallow, macs) / max(1, sum(macs.values()))
