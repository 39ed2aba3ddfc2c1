"""The refresh-policy seam: a policy written here (one class and one registration line) runs in
DeepCacheUNet, the Python engine and the StepBatcher; and the batcher gives each request of every policy the
result it gets alone."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import AdaptiveRefresh, Schedule, compile_deepcache, load_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.policy import StepController, register_policy
from deepcache_compile.serve import StepBatcher


class PrimeRefresh:
    """Full at step 0 and at every step whose index is prime."""

    uses_probe, exportable = False, False

    def controller(self, total=None):
        return StepController(lambda step: step == 0 or (step > 1 and all(step % d for d in range(2, step))))


register_policy("prime", PrimeRefresh)

PRIME_HISTORY = "FSFFSFSFSS"  # steps 0..9: full at 0, 2, 3, 5, 7


@pytest.fixture(scope="module")
def digits():
    return load_digits_model()


def _noise(seed: int, rows: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(rows, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_a_new_policy_runs_by_name_in_the_wrapper_and_the_engine(digits, tmp_path):
    unet, scheduler = digits
    dc = compile_deepcache(unet, branch=1, refresh="prime")
    out = ddim_loop(dc, {"sample": _noise(0)}, 10, scheduler)
    assert dc.history == PRIME_HISTORY
    explicit = compile_deepcache(unet, branch=1, schedule=[0, 2, 3, 5, 7])
    assert torch.equal(out, ddim_loop(explicit, {"sample": _noise(0)}, 10, scheduler))
    exporter = compile_deepcache(unet, branch=1, interval=3)
    exporter.export(tmp_path / "engine", format="pt2", example={"sample": _noise(0), "timestep": 10})  # batch 1
    engine = load_deepcache(tmp_path / "engine").with_schedule(PrimeRefresh())
    torch.testing.assert_close(ddim_loop(engine, {"sample": _noise(0)}, 10, scheduler), out, rtol=1e-5, atol=1e-5)
    assert engine.history == PRIME_HISTORY


def _alone(dc, policy, noise, steps, scheduler):
    return ddim_loop(dc.with_schedule(policy), {"sample": noise}, steps, scheduler)


@pytest.mark.parametrize("which", ["prime", "calibrated", "adaptive", "forecast"])
def test_the_batcher_runs_every_policy_as_a_request_runs_alone(digits, which):
    unet, scheduler = digits
    ranges = dict(batch=(1, 4), height=(8, 24), width=(8, 24))
    options = dict(split="three") if which == "adaptive" else dict(forecast=True) if which == "forecast" else {}
    dc = compile_deepcache(unet, branch=1, dynamic=ranges, **options)
    steps = 8
    if which == "calibrated":
        policy = dc.calibrate(lambda: ddim_loop(dc, {"sample": _noise(9)}, steps, scheduler), full_steps=3)
    else:
        policy = {"prime": PrimeRefresh(), "adaptive": AdaptiveRefresh(threshold=0.05, max_skip=3),
                  "forecast": Schedule("uniform", interval=3)}[which]
    jobs = [(0, 1), (1, 2), (2, 3), (3, 1)]  # (seed, rows): 7 rows, more than one call of max_batch=4 holds
    batcher = StepBatcher(dc, scheduler, max_batch=4)
    requests = [batcher.submit(_noise(seed, rows), steps=steps, schedule=policy) for seed, rows in jobs]
    while batcher.active:
        batcher.tick()
    for (seed, rows), request in zip(jobs, requests):
        expected = _alone(dc, policy, _noise(seed, rows), steps, scheduler)
        out = request.wait(0)
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), (which, seed)
    # Rows, not requests: 7 rows in packs of at most 4 rows need 2 calls per step where the decisions agree.
    assert batcher.rows == 7 * steps and batcher.calls >= 2 * steps


def test_the_batcher_refuses_a_request_larger_than_a_call(digits):
    unet, scheduler = digits
    dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 4), height=(8, 24), width=(8, 24)))
    with pytest.raises(ValueError, match="5 rows, more than the 4 one batched call takes"):
        StepBatcher(dc, scheduler, max_batch=4).submit(_noise(0, 5), steps=4)
