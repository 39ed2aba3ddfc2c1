"""Continuous step-level batching: requests at different steps, sizes and schedules share batched calls and
each ends where it would alone."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import Schedule, compile_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.serve import StepBatcher

# (seed, size, steps, interval)
JOBS = [(0, 16, 6, 2), (1, 16, 9, 3), (2, 12, 5, 5), (3, 16, 7, 3), (4, 12, 8, 2), (5, 16, 4, 3)]


@pytest.fixture(scope="module")
def digits():
    unet, scheduler = load_digits_model()
    alone = compile_deepcache(unet, branch=1)
    noise = {job: torch.randn(1, 1, job[1], job[1], generator=torch.Generator().manual_seed(job[0])) for job in JOBS}
    expected = {job: ddim_loop(alone.with_schedule(Schedule("uniform", interval=job[3])), {"sample": noise[job]},
                               job[2], scheduler) for job in JOBS}
    return unet, scheduler, noise, expected


def test_requests_arriving_at_any_time_end_where_they_would_alone(digits):
    unet, scheduler, noise, expected = digits
    dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 8), height=(8, 24), width=(8, 24)))
    batcher = StepBatcher(dc, scheduler)
    requests = {job: batcher.submit(noise[job], steps=job[2], interval=job[3]) for job in JOBS[:3]}
    batcher.tick()
    batcher.tick()
    requests |= {job: batcher.submit(noise[job], steps=job[2], interval=job[3]) for job in JOBS[3:]}
    while batcher.active:
        batcher.tick()
    for job, request in requests.items():
        out, ref = request.wait(0), expected[job]
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), job
    assert batcher.rows == sum(job[2] for job in JOBS)  # every step of every request ran exactly once
    assert batcher.calls < batcher.rows  # and steps were batched together
    assert len(dc.pairs) == 1  # one dynamic pair for every size and batch


def test_cancelled_and_bad_requests_take_no_other_down(digits):
    unet, scheduler, noise, expected = digits
    dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 8), height=(8, 24), width=(8, 24)))
    batcher = StepBatcher(dc, scheduler)
    keep, drop = JOBS[1], JOBS[3]
    kept = batcher.submit(noise[keep], steps=keep[2], interval=keep[3])
    dropped = batcher.submit(noise[drop], steps=drop[2], interval=drop[3])
    batcher.tick()
    batcher.cancel(dropped)
    assert batcher.active == 1  # its cache rows went with it
    bad = noise[keep].clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="'latents' of this generation's first call contains NaN"):
        batcher.submit(bad, steps=5)
    with pytest.raises(ValueError, match="steps=0"):
        batcher.submit(noise[keep], steps=0)
    with pytest.raises(ValueError, match="width=10 is not a multiple of 4"):
        batcher.submit(torch.randn(1, 1, 16, 10), steps=5)
    with pytest.raises(ValueError, match="height=32 is outside this server's pair's range 8..24"):
        batcher.submit(torch.randn(1, 1, 32, 16), steps=5)
    while batcher.active:
        batcher.tick()
    assert (kept.wait(0) - expected[keep]).abs().max() <= 1e-5 * expected[keep].abs().max()
    with pytest.raises(RuntimeError, match="cancelled"):
        dropped.wait(0)
    with pytest.raises(ValueError, match="dynamic="):
        StepBatcher(compile_deepcache(unet, branch=1), scheduler)


def test_a_failing_request_fails_alone_in_a_shared_call(digits, monkeypatch):
    """A request whose U-Net call or scheduler step fails takes none of the requests batched with it down."""
    unet, scheduler, noise, expected = digits
    dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 8), height=(8, 24), width=(8, 24)))
    batcher = StepBatcher(dc, scheduler)
    jobs = [JOBS[0], JOBS[1], JOBS[3], JOBS[5]]  # all 16 px: one group per step kind
    requests = {job: batcher.submit(noise[job], steps=job[2], interval=job[3]) for job in jobs}
    poisoned, broken = requests[JOBS[1]], requests[JOBS[3]]
    run_unet = batcher._run_unet

    def failing_unet(members, full):
        if poisoned in members and poisoned.step == 2:
            raise RuntimeError("poisoned input")
        return run_unet(members, full)

    monkeypatch.setattr(batcher, "_run_unet", failing_unet)
    monkeypatch.setattr(broken.scheduler, "step", lambda *a, **k: 1 / 0)
    while batcher.active:
        batcher.tick()
    with pytest.raises(RuntimeError, match="poisoned input"):
        poisoned.wait(0)
    with pytest.raises(ZeroDivisionError):
        broken.wait(0)
    for job in (JOBS[0], JOBS[5]):
        out, ref = requests[job].wait(0), expected[job]
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), job


def test_the_service_serves_engine_files_as_it_serves_its_own_pair(digits, tmp_path):
    """`ServeOptions(engine=...)`: a pt2 export of the digits model serves step-batched requests that end where
    the compiled model alone ends; an engine whose batch range is smaller than max_batch is refused by name."""
    import asyncio

    from deepcache_compile.serve.service import DeepCacheService, ServeOptions

    unet, scheduler, noise, expected = digits
    example = {"sample": torch.randn(2, 1, 16, 16), "timestep": torch.full((2,), 999)}
    compile_deepcache(unet, branch=1).export(tmp_path / "engine", format="pt2", example=example, batch=(1, 8),
                                             height=(8, 24), width=(8, 24))
    service = DeepCacheService(ServeOptions(engine=str(tmp_path / "engine"), max_batch=8))
    try:
        jobs = JOBS[:4]

        async def run():
            return await asyncio.gather(*(service.generate(service.submit(seed=job[0], height=job[1], width=job[1],
                                                                           steps=job[2], interval=job[3]))
                                          for job in jobs))

        for job, out in zip(jobs, asyncio.run(run())):
            assert (out - expected[job]).abs().max() <= 1e-5 * expected[job].abs().max(), job
        assert service.stats()["calls"] < sum(job[2] for job in jobs)
    finally:
        service.close()
    with pytest.raises(ValueError, match=r"max_batch=16 is more than the engine's batch range 1\.\.8"):
        DeepCacheService(ServeOptions(engine=str(tmp_path / "engine"), max_batch=16))
