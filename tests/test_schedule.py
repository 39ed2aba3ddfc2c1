"""Schedules: reference values, the reference implementation as an oracle, invariants, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepcache_compile.schedule import Schedule, Step, nonuniform_full_steps


def _reference_nonuniform(total, interval, center, power):
    """The reference helper's code, as published (numpy's complex -> int32 cast keeps the real part)."""
    k = math.ceil(total / interval)
    while power > 1:
        xs = np.linspace((-center) ** (1 / power), (total - center) ** (1 / power), k + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = [0] + [x + center for x in np.unique(np.int32(xs ** power))[1:-1]]
        if len(idx) == k:
            return sorted(int(i) for i in idx)
        power -= 0.02
    return None


def test_nonuniform_reference_values():
    assert nonuniform_full_steps(50, 5, 15, 1.4) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    assert nonuniform_full_steps(50, 10, 15, 1.4) == (0, 9, 17, 26, 37)
    s = Schedule("nonuniform", interval=5, num_inference_steps=50)
    assert s.full_steps() == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


@settings(max_examples=150, deadline=None)
@given(total=st.integers(10, 250), interval=st.integers(2, 12), center=st.integers(1, 30),
       power=st.sampled_from([1.2, 1.4, 1.6, 2.0]))
def test_nonuniform_matches_the_reference_code(total, interval, center, power):
    center = min(center, total - 1)
    expected = _reference_nonuniform(total, interval, center, power)
    if expected is None:
        with pytest.raises(ValueError, match="no non-uniform schedule"):
            nonuniform_full_steps(total, interval, center, power)
    else:
        assert list(nonuniform_full_steps(total, interval, center, power)) == expected


def test_cached_schedules_cannot_be_corrupted_by_a_caller():
    steps = nonuniform_full_steps(50, 5, 15, 1.4)
    with pytest.raises((TypeError, AttributeError)):
        steps.append(1)  # a list here would change what every later caller gets from the cache
    full = Schedule("nonuniform", interval=5, num_inference_steps=50).full_steps()
    full.append(49)  # full_steps() hands out a fresh list
    assert Schedule("nonuniform", interval=5, num_inference_steps=50).full_steps()[-1] == 43


def test_mac_speedup():
    # 50 steps at N=5: 10 full + 40 shallow steps at 22.4 % of a full step's MACs (SD 1.5, branch 1).
    assert Schedule("uniform", interval=5).mac_speedup(50, 0.224) == pytest.approx(50 / (10 + 40 * 0.224))
    assert Schedule("uniform", interval=1).mac_speedup(50, 0.224) == 1


def test_uniform_values():
    s = Schedule("uniform", interval=5)
    assert s.full_steps(50) == list(range(0, 50, 5))
    assert len(s.full_steps(50)) == 10
    assert [s.step(i) for i in range(3)] == [Step.FULL, Step.SHALLOW, Step.SHALLOW]


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 300), interval=st.integers(1, 20), first=st.integers(0, 5), last=st.integers(0, 5))
def test_uniform_invariants(total, interval, first, last):
    s = Schedule("uniform", interval=interval, always_full_first=first, always_full_last=last,
                 num_inference_steps=total)
    full = s.full_steps()
    assert full[0] == 0
    assert all(0 <= f < total for f in full)
    assert full == sorted(set(full))
    assert set(range(min(first, total))) <= set(full)
    assert set(range(max(total - last, 0), total)) <= set(full)
    core = [f for f in full if first <= f < total - last]
    assert core == [f for f in range(first, total - last) if f % interval == 0]


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.integers(1, 99), max_size=20, unique=True), total=st.integers(100, 200))
def test_explicit_invariants(steps, total):
    full = [0] + sorted(steps)
    s = Schedule("explicit", steps=tuple(full), num_inference_steps=total)
    assert s.full_steps() == full
    assert s.is_full(0)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(20, 200), interval=st.integers(2, 10))
def test_nonuniform_invariants(total, interval):
    try:
        full = Schedule("nonuniform", interval=interval, num_inference_steps=total, center=min(15, total // 3),
                        ).full_steps()
    except ValueError:
        return  # no schedule with k full steps exists for these parameters; the error says so
    assert full[0] == 0
    assert len(full) == math.ceil(total / interval)
    assert all(0 <= f < total for f in full) and full == sorted(set(full))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="uniform", interval=0), "interval=0 is invalid"),
    (dict(kind="explicit", steps=(1, 3)), "must start at 0"),
    (dict(kind="explicit", steps=(0, 5, 3)), "strictly increasing"),
    (dict(kind="explicit", steps=(0, 60), num_inference_steps=50), "out of range"),
    (dict(kind="nonuniform", interval=5), "needs num_inference_steps"),
    (dict(kind="nonuniform", interval=5, num_inference_steps=50, power=1.0), "power=1.0"),
    (dict(kind="cosine"), "is not a schedule"),
], ids=["interval0", "explicit-no-zero", "explicit-unsorted", "explicit-range", "nonuniform-no-total",
        "nonuniform-power", "unknown-kind"])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_last_window_needs_the_total():
    s = Schedule("uniform", interval=5, always_full_last=2)
    with pytest.raises(ValueError, match="needs the total number of steps"):
        s.is_full(3)
    assert s.is_full(49, total=50) and s.is_full(48, total=50) and not s.is_full(47, total=50)
