"""Refresh policies beyond a fixed clock: adaptive (refresh when the features drift) and calibrated (a fixed
plan of full steps chosen from one recorded generation).

- `AdaptiveRefresh` is the policy; `AdaptiveController` its per-generation state machine. After the head graph
  runs, the relative L1 change of its probe tensor (the deepest recomputed skip: its step-to-step change tracks
  the cached feature's with Pearson r = 0.97-0.98 on the digits model at branches 1-2, README) is accumulated
  over shallow steps, as TeaCache and FBCache do; a step is full when the sum reaches `threshold`, after
  `max_skip` shallow steps in a row, and at step 0.
- `FirstBlockRefresh` is first-block caching's rule (FBCache, as diffusers' `FirstBlockCacheConfig` runs it):
  a step is full when its probe differs from the probe of the latest full step by more than `threshold`
  (relative L1, no accumulation); on transformers the probe is the computed leading blocks' residual.
- `plan_full_steps` turns a recorded step-by-step similarity of the cached feature (the matrix
  `deepcache-compile analyze` plots) and a budget of full steps into the plan with the least accumulated drift
  (dynamic programming); `CalibratedPlan` carries it with what it was calibrated for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .policy import DeviceRule, register_policy
from .schedule import Calibration, Schedule, mac_speedup

__all__ = ["AdaptiveRefresh", "AdaptiveController", "FirstBlockRefresh", "FirstBlockController", "CalibratedPlan", "plan_full_steps", "reuse_drift",
           "similarity_matrix", "relative_l1", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 0.1  # see README "Adaptive refresh": about N=5's full steps on the digits model at T=50


@dataclass(frozen=True)
class AdaptiveRefresh:
    """Refresh the cache when the head's probe tensor has drifted by `threshold` since the last full step.

    Attributes:
        threshold: the accumulated relative L1 change of the probe that triggers a full step (> 0).
        max_skip: at most this many shallow steps in a row (>= 1), whatever the drift.
        lagged: decide each step on the drift measured up to the step before, so that no step waits for the
            device to hand the drift to the host (the copy runs asynchronously behind the next step).

    Example:
        >>> dc = compile_deepcache(unet, branch=1, refresh=AdaptiveRefresh(threshold=0.1, max_skip=6))
    """

    threshold: float = DEFAULT_THRESHOLD
    max_skip: int = 10
    lagged: bool = False

    uses_probe = True

    @property
    def exportable(self) -> bool:
        """Engine files carry it (head/deep/tail graphs, its controller in both runtimes), except lagged: that
        decides from an asynchronous device copy the engines do not make."""
        return not self.lagged

    def controller(self, total: int | None = None) -> "AdaptiveController":
        return AdaptiveController(self)

    def device_rule(self) -> DeviceRule:
        """The rule as tensor arithmetic (`split="step"`); lagged decisions have no such form."""
        if self.lagged:
            raise ValueError("split='step' decides each step on the device from that step's drift: lagged=True "
                             "(deciding from the step before, on the host) does not apply; drop one of the two")
        return DeviceRule(self.threshold, self.max_skip, accumulate=True)

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold={self.threshold!r} is invalid: it must be a number > 0 (the accumulated "
                             f"relative L1 change that triggers a full step, e.g. {DEFAULT_THRESHOLD})")
        if not isinstance(self.max_skip, int) or isinstance(self.max_skip, bool) or self.max_skip < 1:
            raise ValueError(f"max_skip={self.max_skip!r} is invalid: it must be an integer >= 1 (the most "
                             "shallow steps in a row)")


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`|x - reference|_1 / |reference|_1` as a 0-d float32 tensor on their device (no sync)."""
    x, reference = x.float(), reference.float()
    return torch.linalg.vector_norm(x - reference, 1) / torch.linalg.vector_norm(reference, 1).clamp_min(1e-12)


class AdaptiveController:
    """One call slot's adaptive decisions within a generation: `decide(probe)` once per step, in order.

    Synced: the drift of step t decides step t (one host read per step). Lagged: the drift of step t is copied
    to the host asynchronously and decides step t + 1, so the decisions are the synced ones one step later.
    """

    def __init__(self, policy: AdaptiveRefresh):
        self.policy = policy
        self.previous: torch.Tensor | None = None  # the probe of the step before
        self.pending: tuple[torch.Tensor, object] | None = None  # lagged: (host drift, copy-done event)
        self.accumulated = 0.0
        self.shallow_run = 0
        self.decisions: list[bool] = []

    def decide(self, step: int, probe: torch.Tensor, size=(), timestep=None) -> bool:
        """True where this step must be full. Step 0 always is."""
        if self.previous is None:
            full = True
        else:
            drift = relative_l1(probe, self.previous)
            if self.policy.lagged:
                drift, self.pending = self.pending, _to_host_async(drift)
            self.accumulated += _host_value(drift)
            full = self.accumulated >= self.policy.threshold or self.shallow_run >= self.policy.max_skip
        self.previous = probe
        if full:
            self.accumulated, self.shallow_run = 0.0, 0
        else:
            self.shallow_run += 1
        self.decisions.append(full)
        return full


register_policy("adaptive", AdaptiveRefresh)


@dataclass(frozen=True)
class FirstBlockRefresh:
    """Refresh when the head's probe differs from its value at the latest full step by more than `threshold`.

    The rule of first-block caches (FBCache; diffusers' `FirstBlockCacheConfig(threshold)`): on a transformer
    the probe is the residual of the computed leading blocks, and with the eager backend the decisions and
    outputs are those of `diffusers.hooks.apply_first_block_cache` on the same model (tested). Unlike
    `AdaptiveRefresh` nothing accumulates: each step is compared with the latest full step.

    Attributes:
        threshold: the relative L1 difference (mean |probe - reference| / mean |reference|) above which a step
            is full (> 0; diffusers' default 0.05).
        max_skip: None (no limit, as FBCache), or at most this many cached steps in a row.

    Example:
        >>> dc = compile_deepcache(transformer, branch=0, refresh=FirstBlockRefresh(threshold=0.08))
    """

    threshold: float = 0.05
    max_skip: int | None = None

    uses_probe = True
    exportable = False

    def controller(self, total: int | None = None) -> "FirstBlockController":
        return FirstBlockController(self)

    def device_rule(self) -> DeviceRule:
        return DeviceRule(self.threshold, self.max_skip, accumulate=False)

    def __post_init__(self):
        AdaptiveRefresh(threshold=self.threshold)  # the same checks of the threshold
        if self.max_skip is not None:
            AdaptiveRefresh(max_skip=self.max_skip)


class FirstBlockController:
    """One call slot's first-block-cache decisions: the probe of each step against the latest full step's."""

    def __init__(self, policy: FirstBlockRefresh):
        self.policy = policy
        self.reference: torch.Tensor | None = None
        self.shallow_run = 0
        self.decisions: list[bool] = []

    def decide(self, step: int, probe: torch.Tensor, size=(), timestep=None) -> bool:
        limit = self.policy.max_skip
        full = (self.reference is None or float(relative_l1(probe, self.reference)) > self.policy.threshold
                or (limit is not None and self.shallow_run >= limit))
        if full:
            self.reference, self.shallow_run = probe, 0
        else:
            self.shallow_run += 1
        self.decisions.append(full)
        return full


register_policy("first-block", FirstBlockRefresh)


def _to_host_async(value: torch.Tensor) -> tuple[torch.Tensor, object]:
    if value.device.type != "cuda":
        return value, None
    host = torch.empty((), dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _host_value(drift) -> float:
    if drift is None:  # lagged, second step: nothing measured yet
        return 0.0
    if isinstance(drift, tuple):
        value, done = drift
        if done is not None:
            done.synchronize()  # recorded a step ago: finished long since
        return float(value)
    return float(drift)


def similarity_matrix(features: list[torch.Tensor]) -> torch.Tensor:
    """`(T, T)` mean cosine similarity of per-step features `(batch, ...)`: per sample, flattened, then
    averaged over the batch (the paper's Figure 2)."""
    feats = torch.nn.functional.normalize(torch.stack([f.flatten(1).float() for f in features]), dim=2)
    return torch.einsum("ibd,jbd->ij", feats, feats) / feats.shape[1]


def reuse_drift(similarity: torch.Tensor, full_steps) -> float:
    """Mean over all steps of `1 - similarity[t, f(t)]`, f(t) the latest full step: 0 for all-full plans."""
    sim, full, last, total = similarity.double().numpy(), set(full_steps), 0, len(similarity)
    drift = 0.0
    for t in range(total):
        last = t if t in full else last
        drift += 1 - sim[t, last]
    return float(drift / total)


def plan_full_steps(similarity: torch.Tensor, full_steps: int) -> tuple[int, ...]:
    """The `full_steps` full steps (starting at 0) that minimise `reuse_drift` for this similarity matrix.

    Example:
        >>> plan_full_steps(torch.eye(4) * 0 + 1, 2)   # features never change: any plan is free
        (0, 1)
    """
    total = len(similarity)
    if not isinstance(full_steps, int) or not 1 <= full_steps <= total:
        raise ValueError(f"a budget of {full_steps!r} full steps does not fit a generation of {total} steps: "
                         f"use 1..{total}")
    cost = 1 - similarity.double().numpy()
    # segment[s, e]: drift of steps s+1..e-1 reusing the feature of full step s.
    prefix = np.concatenate([np.zeros((total, 1)), np.cumsum(np.triu(cost, 1), axis=1)], axis=1)
    segment = prefix  # segment[s, e] = prefix[s, e]: triu zeroes the steps up to s
    best = np.full((full_steps + 1, total + 1), np.inf)  # best[k, e]: k full steps cover steps 0..e-1
    back = np.zeros((full_steps + 1, total + 1), dtype=int)
    for e in range(1, total + 1):
        best[1, e] = segment[0, e]
    for k in range(2, full_steps + 1):
        for e in range(k, total + 1):
            options = best[k - 1, np.arange(k - 1, e)] + segment[np.arange(k - 1, e), e]
            back[k, e] = k - 1 + int(np.argmin(options))
            best[k, e] = options.min()
    steps, e = [], total
    for k in range(full_steps, 0, -1):
        start = back[k, e] if k > 1 else 0
        steps.append(int(start))
        e = start
    return tuple(sorted(steps))


@dataclass(frozen=True)
class CalibratedPlan:
    """A fixed plan of full steps chosen from one recorded full-model generation (`DeepCacheUNet.calibrate`).

    It is a static schedule (`schedule`): no decision at run time; it exports into the engine manifest and runs
    in the native runtime unchanged. Generations with another step count, timesteps or resolution than the
    calibration are refused (see `schedule.Calibration`).

    Attributes:
        steps: the full steps.
        calibration: the step count, timesteps and sample size it was made for.
        branch: the branch whose cached feature was recorded.
        drift: the plan's predicted `reuse_drift` (mean 1 - cosine similarity to the reused feature).
        uniform_drift: the same for as many full steps evenly spaced (uniform 1:N where N divides T).
        mac_share: shallow MACs / full MACs at this branch (for `mac_speedup`), if known.
    """

    steps: tuple[int, ...]
    calibration: Calibration
    branch: int
    drift: float
    uniform_drift: float
    mac_share: float | None = None

    uses_probe = False
    exportable = True

    def controller(self, total: int | None = None):
        return self.schedule.controller(total)

    @property
    def total(self) -> int:
        return len(self.calibration.timesteps)

    @property
    def schedule(self) -> Schedule:
        return Schedule("explicit", steps=self.steps, num_inference_steps=self.total, calibration=self.calibration)

    @property
    def mac_speedup(self) -> float | None:
        return None if self.mac_share is None else mac_speedup(self.total, len(self.steps), self.mac_share)

    @classmethod
    def from_similarity(cls, similarity: torch.Tensor, calibration: Calibration, branch: int,
                        full_steps: int | None = None, speedup: float | None = None,
                        mac_share: float | None = None) -> "CalibratedPlan":
        """The plan for a budget given as `full_steps` or as a MAC `speedup` (which needs `mac_share`)."""
        total = len(similarity)
        full_steps = budget_full_steps(total, full_steps, speedup, mac_share)
        steps = plan_full_steps(similarity, full_steps)
        even = tuple(sorted({round(i * total / full_steps) for i in range(full_steps)}))
        return cls(steps, calibration, branch, reuse_drift(similarity, steps), reuse_drift(similarity, even),
                   mac_share)

    def __str__(self) -> str:
        speed = f", {self.mac_speedup:.2f}x fewer MACs" if self.mac_share is not None else ""
        return (f"{len(self.steps)} full steps of {self.total} at branch {self.branch}{speed}: {list(self.steps)}; "
                f"predicted drift {self.drift:.4f} (as many full steps evenly spaced: {self.uniform_drift:.4f})")


def budget_full_steps(total: int, full_steps: int | None, speedup: float | None, mac_share: float | None) -> int:
    """A budget as a number of full steps: given, or the most full steps that still reach `speedup`."""
    if (full_steps is None) == (speedup is None):
        raise ValueError("give the budget as full_steps=K or as speedup=X (MACs of the full model over the plan's), "
                         "one of the two")
    if full_steps is not None:
        if isinstance(full_steps, bool) or not isinstance(full_steps, int) or not 1 <= full_steps <= total:
            raise ValueError(f"full_steps={full_steps!r} does not fit a generation of {total} steps: use 1..{total} "
                             "(step 0 is always full)")
        return full_steps
    if mac_share is None:
        raise ValueError("speedup=... needs the shallow step's MAC share: pass full_steps=K instead")
    if not speedup >= 1 or mac_speedup(total, 1, mac_share) < speedup:
        raise ValueError(f"speedup={speedup} is out of reach: with {total} steps this branch reaches at most "
                         f"{mac_speedup(total, 1, mac_share):.2f}x; use a value in 1..that, or a deeper branch")
    return max(k for k in range(1, total + 1) if mac_speedup(total, k, mac_share) >= speedup)
