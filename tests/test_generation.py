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


def test_a_broken_generation_fails_alone(shared):
    """NaN latents and an exception in the middle of a generation: a clear error for that generation; the
    generation running beside it in another thread, the compiled pairs and the next generation are unaffected."""
    dc, calls, alone = shared
    pairs = dc.pairs
    job, other = JOBS[1], JOBS[3]
    outcome = {}

    def beside():
        outcome["other"] = ddim_loop(dc, calls[other], other[3])

    thread = threading.Thread(target=beside)
    thread.start()
    broken = {**calls[job], "sample": calls[job]["sample"].clone()}
    broken["sample"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'sample' of this generation's first call contains NaN"):
        ddim_loop(dc, broken, job[3])
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(job[3])
    call = calls[job]
    for t in scheduler.timesteps[:3]:
        dc(**{**call, "timestep": t})
    wrong = {**call, "encoder_hidden_states": call["encoder_hidden_states"][..., :-1]}  # 31 features, not 32
    with pytest.raises(Exception, match="could not trace this U-Net"):
        dc(**{**wrong, "timestep": scheduler.timesteps[3]})
    assert dc.history == "FSS"  # the failed call left the generation's state as it was
    thread.join()
    assert torch.equal(outcome["other"], alone[other])
    assert torch.equal(ddim_loop(dc, calls[job], job[3]), alone[job])
    assert {id(p) for p in dc.pairs} == {id(p) for p in pairs}  # none compiled, none dropped


def test_a_step_count_of_zero_is_refused():
    dc = compile_deepcache(make_unet("sd-mini"), branch=1, interval=3)
    with pytest.raises(ValueError, match="total=0 steps: a generation has at least 1 step"):
        dc.full_steps(0)
    with pytest.raises(ValueError, match="num_inference_steps=0 must be >= 1"):
        compile_deepcache(make_unet("sd-mini"), branch=1, schedule="nonuniform", num_inference_steps=0)


def test_traces_and_steps_exclude_each_other():
    """torch.export flips process-wide flags while it traces: a trace waits for running steps, and new steps wait
    for a waiting trace (tracing.TraceGate)."""
    from deepcache_compile.tracing import TraceGate

    gate, events = TraceGate(), []
    step_entered, trace_waiting = threading.Event(), threading.Event()

    def step(name, hold):
        with gate.step():
            events.append(f"{name} in")
            step_entered.set()
            hold.wait(5)
            events.append(f"{name} out")

    def trace():
        trace_waiting.set()
        with gate.trace():
            events.append("trace")

    release = threading.Event()
    first = threading.Thread(target=step, args=("step1", release))
    first.start()
    step_entered.wait(5)
    tracer = threading.Thread(target=trace)
    tracer.start()
    trace_waiting.wait(5)
    while not gate._traces:  # the tracer registered and now waits for step1
        pass
    second = threading.Thread(target=step, args=("step2", threading.Event()))
    second.start()
    release.set()
    for thread in (first, tracer, second):
        thread.join(10)
    assert events[:3] == ["step1 in", "step1 out", "trace"] and events[3:] == ["step2 in", "step2 out"]
