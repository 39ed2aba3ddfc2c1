"""Schedules: pure functions from (step index, total steps) to FULL or SHALLOW.

Steps are U-Net calls within one generation (per call slot, see `DeepCacheConfig.calls_per_step`), counted
from 0. Step 0 is always full. The non-uniform schedule reproduces the reference implementation exactly,
complex powers included (docs/method.md).
"""

from __future__ import annotations

import enum
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Step", "Schedule", "Calibration", "make_schedule", "mac_speedup", "uniform_full_steps", "nonuniform_full_steps",
           "DEFAULT_INTERVAL", "DEFAULT_CENTER", "DEFAULT_POWER"]

KINDS = ("uniform", "nonuniform", "explicit")
DEFAULT_INTERVAL = 3  # the reference README's choice
DEFAULT_CENTER = 15  # the reference code's non-uniform center c
DEFAULT_POWER = 1.4  # and power p


@dataclass(frozen=True)
class Calibration:
    """What a calibrated plan was made for (see `refresh.CalibratedPlan`); generations must match it.

    Attributes:
        timesteps: the scheduler's timesteps of the calibration run, one per step (their count is T).
        size: the sample's (height, width) in the calibration run.
    """

    timesteps: tuple[float, ...]
    size: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if not self.timesteps:
            raise ValueError("a calibration needs the timesteps of at least one step")

    def check(self, step: int, sample_size: tuple[int, ...], timestep) -> None:
        """Raises ValueError where a generation's step does not fit the calibration: at steps 0 and 1 the
        timestep (read once each: two host reads per generation) and at step 0 the size; past the last step,
        any step."""
        total = len(self.timesteps)
        if step >= total:
            raise ValueError(f"this generation runs more than the {total} steps the calibrated plan was made for: "
                             f"calibrate again with num_inference_steps={step + 1} or more")
        if step == 0 and tuple(sample_size) != self.size:
            raise ValueError(f"sample size {tuple(sample_size)} differs from the calibration run's {self.size}: "
                             "calibrate again at this resolution")
        if step < 2 and timestep is not None:
            value = timestep_value(timestep)
            if value != self.timesteps[step]:
                raise ValueError(f"step {step} has timestep {value:g}, the calibration run had "
                                 f"{self.timesteps[step]:g}: the plan was made for {total} steps of another "
                                 "schedule (a plan is not truncated or stretched); calibrate again with this step "
                                 "count and scheduler")


def timestep_value(timestep) -> float:
    """A timestep (a number or a tensor, possibly batched) as one float: a host read, a sync for device tensors."""
    return float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)


class _ScheduleController:
    """A schedule's decisions for one generation; a calibrated plan's also check the generation fits it."""

    def __init__(self, schedule: "Schedule", total: int | None):
        self.schedule, self.total = schedule, total

    def decide(self, step: int, probe=None, size=(), timestep=None) -> bool:
        if self.schedule.calibration is not None:
            self.schedule.calibration.check(step, size, timestep)
        return self.schedule.is_full(step, self.total)


class Step(enum.Enum):
    FULL = "full"
    SHALLOW = "shallow"


@dataclass(frozen=True)
class Schedule:
    """Which steps of a generation run the full U-Net.

    Attributes:
        kind: "uniform" (full at 0, N, 2N, ...), "nonuniform" (paper eq. 7) or "explicit" (`steps`).
        interval: N of the 1:N schedule (uniform and nonuniform).
        steps: the full steps of an explicit schedule; must start at 0.
        num_inference_steps: the total T; required by "nonuniform" and by `always_full_last`.
        center: the nonuniform schedule's center step c.
        power: the nonuniform schedule's starting power p (> 1).
        always_full_first: the first this-many steps are always full.
        always_full_last: the last this-many steps are always full.
        calibration: for a calibrated plan (explicit steps), what it was made for; generations that do not
            match it are refused.

    Example:
        >>> Schedule("uniform", interval=5).full_steps(12)
        [0, 5, 10]
        >>> Schedule("nonuniform", interval=10, num_inference_steps=50).full_steps()
        [0, 9, 17, 26, 37]
    """

    kind: str = "uniform"
    interval: int = DEFAULT_INTERVAL
    steps: tuple[int, ...] = ()
    num_inference_steps: int | None = None
    center: int = DEFAULT_CENTER
    power: float = DEFAULT_POWER
    always_full_first: int = 0
    always_full_last: int = 0
    calibration: Calibration | None = None

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if isinstance(self.calibration, dict):  # read back from a manifest
            object.__setattr__(self, "calibration", Calibration(**self.calibration))
        _validate(self)

    uses_probe = False  # the refresh-policy protocol (policy.RefreshPolicy): decided from the step alone

    @property
    def exportable(self) -> bool:
        return True

    def controller(self, total: int | None = None) -> "_ScheduleController":
        return _ScheduleController(self, total)

    @property
    def needs_total(self) -> bool:
        return self.kind == "nonuniform" or self.always_full_last > 0

    def is_full(self, step: int, total: int | None = None) -> bool:
        """True where `step` runs the full U-Net. `total` defaults to `num_inference_steps`."""
        if step < 0:
            raise ValueError(f"step={step} is negative: steps are counted from 0")
        total = self._total(total)
        if step < self.always_full_first or (total is not None and step >= total - self.always_full_last):
            return True
        if self.kind == "uniform":
            return step % self.interval == 0
        if self.kind == "explicit":
            return step in _as_set(self.steps)
        return step in _as_set(nonuniform_full_steps(total, self.interval, self.center, self.power))

    def step(self, step: int, total: int | None = None) -> Step:
        return Step.FULL if self.is_full(step, total) else Step.SHALLOW

    def full_steps(self, total: int | None = None) -> list[int]:
        """The full-step indices of a generation of `total` steps."""
        total = self._total(total)
        if total is None:
            raise ValueError("full_steps() needs the number of steps: pass total, e.g. full_steps(50)")
        return [s for s in range(total) if self.is_full(s, total)]

    def mac_speedup(self, total: int, shallow_share: float) -> float:
        """MACs of `total` full steps over the MACs this schedule spends (`shallow_share` = shallow / full MACs).

        Example:
            >>> round(Schedule("uniform", interval=5).mac_speedup(50, 0.2), 3)   # 10 full + 40 shallow steps
            2.778
        """
        return mac_speedup(total, len(self.full_steps(total)), shallow_share)

    def _total(self, total: int | None) -> int | None:
        total = self.num_inference_steps if total is None else int(total)
        if total is not None and total < 1:
            raise ValueError(f"total={total} steps: a generation has at least 1 step")
        if total is None and self.needs_total:
            raise ValueError(
                f"the {self.kind!r} schedule with always_full_last={self.always_full_last} needs the total number "
                "of steps: pass num_inference_steps=... to compile_deepcache (or total= to this call)"
            )
        return total


def _validate(s: Schedule) -> None:
    if s.kind not in KINDS:
        raise ValueError(f"schedule={s.kind!r} is not a schedule: use one of {KINDS} or a list of full steps")
    if s.kind != "explicit" and (not isinstance(s.interval, int) or s.interval < 1):
        raise ValueError(f"interval={s.interval!r} is invalid: it must be an integer >= 1 (1 = no caching)")
    if s.num_inference_steps is not None and s.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={s.num_inference_steps} must be >= 1")
    if s.always_full_first < 0 or s.always_full_last < 0:
        raise ValueError("always_full_first and always_full_last must be >= 0")
    if s.kind == "explicit":
        _validate_explicit(s.steps, s.num_inference_steps)
    if s.calibration is not None and (s.kind != "explicit" or s.num_inference_steps != len(s.calibration.timesteps)):
        raise ValueError("a calibration belongs to an explicit schedule of its own step count: build it with "
                         "CalibratedPlan.schedule")
    if s.kind == "nonuniform":
        if s.num_inference_steps is None:
            raise ValueError(
                "schedule='nonuniform' needs num_inference_steps=T (the paper's k = ceil(T/N) full steps are "
                "placed over T steps): pass e.g. num_inference_steps=50"
            )
        if s.power <= 1:
            raise ValueError(f"power={s.power} must be > 1 for the nonuniform schedule (the reference uses 1.4)")
        if not 0 <= s.center < s.num_inference_steps:
            raise ValueError(f"center={s.center} must lie in 0..{s.num_inference_steps - 1}")
        nonuniform_full_steps(s.num_inference_steps, s.interval, s.center, s.power)  # raises if infeasible


def _validate_explicit(steps: tuple[int, ...], total: int | None) -> None:
    if not steps or steps[0] != 0:
        raise ValueError(f"full steps {list(steps)} must start at 0: the first step has no cache to reuse")
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"full steps {list(steps)} must be strictly increasing")
    if total is not None and steps[-1] >= total:
        raise ValueError(
            f"full step {steps[-1]} is out of range for num_inference_steps={total}: valid steps are 0..{total - 1}"
        )


@functools.lru_cache(maxsize=64)
def _as_set(steps: tuple[int, ...]) -> frozenset[int]:
    return frozenset(steps)


def mac_speedup(total: int, full_steps: int, shallow_share: float) -> float:
    """`total` full steps' MACs over those of `full_steps` full and `total - full_steps` shallow steps."""
    return total / (full_steps + (total - full_steps) * shallow_share)


def make_schedule(
    schedule: str | Sequence[int] = "uniform",
    interval: int | None = None,
    num_inference_steps: int | None = None,
    center: int = DEFAULT_CENTER,
    power: float = DEFAULT_POWER,
    always_full_first: int = 0,
    always_full_last: int = 0,
) -> Schedule:
    """A `Schedule` from `compile_deepcache`'s keywords: a kind name, or a list of ints = explicit full steps.

    Example:
        >>> make_schedule([0, 3, 7]).kind
        'explicit'
    """
    common = dict(num_inference_steps=num_inference_steps, always_full_first=always_full_first,
                  always_full_last=always_full_last)
    if not isinstance(schedule, str):
        if interval is not None:
            raise ValueError("pass either interval=N or an explicit list of full steps, not both")
        return Schedule("explicit", steps=tuple(schedule), **common)
    interval = DEFAULT_INTERVAL if interval is None else interval
    return Schedule(schedule, interval=interval, center=center, power=power, **common)


def uniform_full_steps(total: int, interval: int) -> tuple[int, ...]:
    """Full steps of the uniform 1:N schedule: 0, N, 2N, ..."""
    return tuple(range(0, total, interval))


@functools.lru_cache(maxsize=64)
def nonuniform_full_steps(total: int, interval: int, center: int = DEFAULT_CENTER,
                          power: float = DEFAULT_POWER) -> tuple[int, ...]:
    """Full steps of the paper's non-uniform schedule, bit-for-bit the reference implementation.

    `(-c) ** (1/p)` is complex in Python; the reference casts the complex powers to int32, which keeps the
    real part truncated toward zero. A real-valued rewrite gives other steps, so the complex form is kept.

    Example:
        >>> nonuniform_full_steps(50, 5, 15, 1.4)
        (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    """
    k = math.ceil(total / interval)
    p = power
    while p > 1:
        xs = np.linspace(complex(-center) ** (1 / p), (total - center) ** (1 / p), k + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            truncated = np.trunc((xs ** p).real).astype(np.int32)
        idx = [0] + [int(x) + center for x in np.unique(truncated)[1:-1]]
        if len(idx) == k:
            return tuple(sorted(idx))  # immutable: the lru_cache hands the same object to every caller
        p -= 0.02
    raise ValueError(
        f"no non-uniform schedule with {k} full steps exists for num_inference_steps={total}, interval={interval}, "
        f"center={center}: lower center or interval, or use schedule='uniform'"
    )
