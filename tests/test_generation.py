"""Generation state under concurrency: threads and asyncio tasks sharing one DeepCacheUNet never cross-talk."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.sampling import ddim_loop

from conftest import make_call, make_unet

# (seed, batch, size, steps): different noise, batch sizes, resolutions and lengths.
JOBS = [(0, 1, 8, 4), (1, 2, 8, 7), (2, 1, 16, 5), (3, 2, 16, 9), (4, 1, 8, 11), (5, 2, 8, 6), (6, 1, 16, 8),
        (7, 1, 8, 10)]


@pytest.fixture(scope="module")
def shared():
    """One DeepCacheUNet for the module (its compiled pairs are shared, as in a server), the jobs' calls, and
    each job's result run alone, one after the other."""
    unet = make_unet("sd")
    dc = compile_deepcache(unet, branch=1, interval=3)
    calls = {job: make_call(unet, batch=job[1], seed=job[0], height=job[2], width=job[2]) for job in JOBS}
    alone = {job: ddim_loop(dc, calls[job], job[3]) for job in JOBS}
    return dc, calls, alone


def test_eight_threads_each_equal_their_generation_run_alone(shared):
    dc, calls, alone = shared
    start = threading.Barrier(len(JOBS))
    together, histories = {}, {}

    def run(job):
        start.wait()
        together[job] = ddim_loop(dc, calls[job], job[3])
        histories[job] = dc.history

    threads = [threading.Thread(target=run, args=(job,)) for job in JOBS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in JOBS:
        assert torch.equal(together[job], alone[job]), f"generation {job} differs when run beside the others"
        assert histories[job] == "".join("F" if s % 3 == 0 else "S" for s in range(job[3]))
    assert len(dc.pairs) == 4  # 2 sizes x 2 batches: the threads shared the compiled pairs


def test_interleaved_generations_in_one_thread_are_isolated_by_generation_blocks(shared):
    dc, calls, alone = shared
    jobs = JOBS[:3]

    async def generate(job):
        call, steps = calls[job], job[3]
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(steps)
        latents, extra = call["sample"], {k: v for k, v in call.items() if k not in ("sample", "timestep")}
        with dc.generation():
            for t in scheduler.timesteps:
                latents = scheduler.step(dc(latents, t, **extra).sample, t, latents).prev_sample
                await asyncio.sleep(0)  # let the other generations take a step
            return latents, dc.history

    async def main():
        return await asyncio.gather(*(generate(job) for job in jobs))

    with torch.no_grad():
        results = asyncio.run(main())
    for job, (latents, history) in zip(jobs, results):
        assert torch.equal(latents, alone[job])
        assert history == "".join("F" if s % 3 == 0 else "S" for s in range(job[3]))


def test_reset_and_history_belong_to_the_calling_thread(shared):
    dc, calls, _ = shared
    call = calls[JOBS[0]]
    dc.reset()
    for t in (900, 800):
        dc(**{**call, "timestep": t})
    seen = SimpleNamespace()

    def other():
        seen.before = dc.history
        dc(**{**call, "timestep": 900})
        dc.reset()
        seen.after = dc.history

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert (seen.before, seen.after) == ("", "")
    assert dc.history == "FS" and dc.step == 2  # untouched by the other thread's calls and reset
