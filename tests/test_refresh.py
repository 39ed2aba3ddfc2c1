"""Refresh policies: the adaptive controller, calibrated plans, forecast, and the dispatcher running them,
each against a reference derived apart from the code under test."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler

from deepcache_compile import AdaptiveRefresh, compile_deepcache, list_branches
from deepcache_compile.calls import CallFlattener
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.graph.branches import find_branches
from deepcache_compile.graph.partition import split_at_branch
from deepcache_compile.refresh import AdaptiveController, plan_full_steps, reuse_drift
from deepcache_compile.schedule import Calibration, Schedule

from conftest import make_call, make_unet, trace


def _probes(drifts):
    """Probe tensors whose relative L1 change from one step to the next is exactly `drifts[t - 1]`."""
    probes = [torch.ones(4)]
    for d in drifts:
        probes.append(probes[-1] * (1 + d))
    return probes


def _decisions(policy, probes):
    controller = AdaptiveController(policy)
    return [controller.decide(step, p) for step, p in enumerate(probes)]


def test_adaptive_controller_accumulates_drift_until_the_threshold():
    drifts = [0.1, 0.1, 0.1, 0.3, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    full = _decisions(AdaptiveRefresh(threshold=0.22, max_skip=100), _probes(drifts))
    # By hand: 0.1, 0.2 < 0.22; 0.3 >= 0.22 -> full (reset); 0.3 -> full; then 0.05 x 5 = 0.25 -> full at the 5th.
    assert full == [True, False, False, True, True, False, False, False, False, True, False]
    bounded = _decisions(AdaptiveRefresh(threshold=100.0, max_skip=3), _probes(drifts))
    assert bounded == [True, False, False, False, True, False, False, False, True, False, False]


def test_lagged_decisions_are_the_synced_ones_one_step_later():
    drifts = [float(d) for d in torch.rand(40, generator=torch.Generator().manual_seed(0)) * 0.2]
    synced = _decisions(AdaptiveRefresh(threshold=0.3, max_skip=1000), _probes(drifts))
    lagged = _decisions(AdaptiveRefresh(threshold=0.3, max_skip=1000, lagged=True), _probes(drifts))
    assert lagged[0] and not lagged[1]
    assert lagged[2:] == synced[1:-1]
    assert 3 < sum(synced) < 30  # the threshold binds, the comparison is not vacuous


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=0), "threshold=0 is invalid"), (dict(threshold=-1.0), "threshold=-1.0 is invalid"),
    (dict(threshold=float("nan")), "threshold=nan is invalid"), (dict(max_skip=0), "max_skip=0 is invalid")])
def test_bad_adaptive_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveRefresh(**kwargs)


def test_plan_is_the_best_of_all_plans():
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        feats = torch.cumsum(torch.randn(9, 5, 6, generator=gen), 0)  # a random walk: features drift
        sim = torch.nn.functional.cosine_similarity(feats[:, None], feats[None, :], dim=-1).mean(-1)
        for k in (1, 2, 4, 9):
            plans = [(0, *rest) for rest in itertools.combinations(range(1, 9), k - 1)]
            best = min(plans, key=lambda p: reuse_drift(sim, p))
            assert reuse_drift(sim, plan_full_steps(sim, k)) == pytest.approx(reuse_drift(sim, best), abs=1e-12)
    with pytest.raises(ValueError, match="a budget of 10 full steps does not fit a generation of 9 steps"):
        plan_full_steps(sim, 10)


@pytest.fixture(scope="module")
def tiny():
    unet = make_unet("sd")
    call = make_call(unet, batch=2)
    return unet, call


def _reference_adaptive(unet, call, policy, steps, branch=1):
    """Adaptive DeepCache without the project's runtime: the probe from a forward hook on the skip's producer
    module, the drift by hand, full steps by the U-Net itself, shallow steps by the two-graph split."""
    info = list_branches(unet, **call)[branch]
    traced = trace(unet, call)
    split = split_at_branch(traced.gm, find_branches(traced.gm)[branch])
    flatten, seen = CallFlattener(unet), []
    module = unet.get_submodule(info.producer_module)
    hook = module.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents, extra = call["sample"], {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    previous, accumulated, run, cache, history = None, 0.0, 0, None, ""
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                seen.clear()
                unet(latents, t, **extra)  # the probe is recomputed on every step, full or shallow
                probe = seen[-1]
                full = previous is None
                if not full:
                    accumulated += ((probe - previous).abs().sum() / previous.abs().sum()).item()
                    full = accumulated >= policy.threshold or run >= policy.max_skip
                previous = probe
                inputs = flatten((latents, t), extra).tensors
                if full:
                    out, cache = split.full(*inputs)
                    accumulated, run = 0.0, 0
                else:
                    (out,), run = split.shallow(*inputs, cache), run + 1
                history += "F" if full else "S"
                latents = scheduler.step(out, t, latents).prev_sample
    finally:
        hook.remove()
    return latents, history


def test_adaptive_dispatch_equals_the_reference(tiny):
    unet, call = tiny
    policy = AdaptiveRefresh(threshold=0.5, max_skip=3)
    expected, history = _reference_adaptive(unet, call, policy, 12)
    dc = compile_deepcache(unet, branch=1, refresh=policy)
    # The drift is summed by torch.linalg.vector_norm here, by sum() in the reference: a decision could flip
    # only where the sum lands within rounding of the threshold, which these values do not.
    assert torch.equal(ddim_loop(dc, call, 12), expected)
    assert dc.history == history
    assert "S" in history and history.count("F") >= 3  # both kinds of step ran


def test_adaptive_lagged_on_fixed_inputs(tiny):
    """With inputs that do not depend on the outputs (here: recorded latents fed back), the probes are the
    same in both modes, so lagged decisions are the synced ones one step later."""
    unet, call = tiny
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(16)
    latents = [call["sample"] * (1 - i / 20) for i in range(16)]
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    histories = []
    for lagged in (False, True):
        dc = compile_deepcache(unet, branch=1, refresh=AdaptiveRefresh(threshold=0.3, max_skip=100, lagged=lagged))
        for x, t in zip(latents, scheduler.timesteps):
            dc(x, t, **extra)
        histories.append(dc.history)
    synced, lagged = histories
    assert lagged[:2] == "FS" and lagged[2:] == synced[1:-1]
    assert synced.count("F") > 1 and "S" in synced


def test_forecast_equals_the_extrapolation_by_hand(tiny):
    unet, call = tiny
    traced = trace(unet, call)
    split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
    flatten = CallFlattener(unet)
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    latents, fulls = call["sample"], []  # (step, cache) of the full steps so far
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            inputs = flatten((latents, t), extra).tensors
            if step % 3 == 0:
                out, cache = split.full(*inputs)
                fulls.append((step, cache))
            else:
                (s1, c1) = fulls[-1]
                guess = c1 if len(fulls) < 2 else c1 + ((c1 - fulls[-2][1]) / (s1 - fulls[-2][0])) * (step - s1)
                (out,) = split.shallow(*inputs, guess)
            latents = scheduler.step(out, t, latents).prev_sample
    for split_kind in ("pair", "three"):
        dc = compile_deepcache(unet, branch=1, interval=3, forecast=True, split=split_kind)
        torch.testing.assert_close(ddim_loop(dc, call, 10), latents, rtol=0, atol=0)
    plain = ddim_loop(compile_deepcache(unet, branch=1, interval=3), call, 10)
    assert not torch.equal(plain, latents)  # forecast changed the shallow steps


def _recorded_plan_by_hand(unet, call, steps, branch, k):
    """The cached feature from a forward pre-hook on the consumer layer (its input's first channels), the
    cosine similarity by torch's own function, and the best plan by brute force."""
    info = list_branches(unet, **call)[branch]
    feats = []
    module = unet.get_submodule(info.consumer_module)
    hook = module.register_forward_pre_hook(lambda m, args: feats.append(args[0][:, :info.cache_shape[1]].clone()))
    try:
        ddim_loop(unet, call, steps)
    finally:
        hook.remove()
    flat = torch.stack([f.flatten(1) for f in feats])
    sim = torch.nn.functional.cosine_similarity(flat[:, None], flat[None, :], dim=-1).mean(-1)
    plans = [(0, *rest) for rest in itertools.combinations(range(1, steps), k - 1)]
    return min(plans, key=lambda p: reuse_drift(sim, p))


def test_calibrated_plan_from_one_recorded_generation(tiny):
    unet, call = tiny
    dc = compile_deepcache(unet, branch=1, interval=2)
    plan = dc.calibrate(lambda: ddim_loop(dc, call, 7), full_steps=3)
    assert plan.steps == _recorded_plan_by_hand(unet, call, 7, 1, 3)
    assert plan.total == 7 and plan.calibration.size == (8, 8) and plan.drift <= plan.uniform_drift
    planned = dc.with_schedule(plan)
    ddim_loop(planned, call, 7)
    assert planned.history == "".join("F" if s in plan.steps else "S" for s in range(7))
    assert dc.history == ""  # the calibration ran in a generation of its own: nothing leaks into this thread's
    by_speed = dc.calibrate(lambda: ddim_loop(dc, call, 7), speedup=1.5)
    assert by_speed.mac_speedup >= 1.5 and len(by_speed.steps) >= 1
    same = compile_deepcache(unet, branch=1, schedule=plan)
    assert torch.equal(ddim_loop(same, call, 7), ddim_loop(planned, call, 7))


def test_calibrated_plan_refuses_other_generations(tiny):
    unet, call = tiny
    dc = compile_deepcache(unet, branch=1, interval=2)
    planned = dc.with_schedule(dc.calibrate(lambda: ddim_loop(dc, call, 6), full_steps=2))
    with pytest.raises(ValueError, match="the plan was made for 6 steps of another schedule"):
        ddim_loop(planned, call, 4)
    with pytest.raises(ValueError, match=r"sample size \(16, 16\) differs from the calibration run's \(8, 8\)"):
        ddim_loop(planned, make_call(unet, batch=2, height=16, width=16), 6)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(6)
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    for t in scheduler.timesteps:
        planned(call["sample"], t, **extra)
    with pytest.raises(ValueError, match="more than the 6 steps the calibrated plan was made for"):
        planned(call["sample"], scheduler.timesteps[-1] - 1, **extra)
    ddim_loop(planned, call, 6)  # a matching generation still runs


@pytest.mark.parametrize("kwargs, message", [
    (dict(full_steps=0), "full_steps=0 does not fit a generation of 5 steps: use 1..5"),
    (dict(full_steps=6), "full_steps=6 does not fit"), (dict(), "give the budget as full_steps=K or as speedup"),
    (dict(full_steps=2, speedup=2.0), "one of the two"), (dict(speedup=100.0), "speedup=100.0 is out of reach")])
def test_bad_budgets_are_refused(tiny, kwargs, message):
    unet, call = tiny
    dc = compile_deepcache(unet, branch=1)
    with pytest.raises(ValueError, match=message):
        dc.calibrate(lambda: ddim_loop(dc, call, 5), **kwargs)


def test_bad_calibration_runs_and_policies_are_refused(tiny):
    unet, call = tiny
    dc = compile_deepcache(unet, branch=1)
    with pytest.raises(ValueError, match="made no call of this DeepCacheUNet"):
        dc.calibrate(lambda: None, full_steps=2)
    with pytest.raises(ValueError, match="ran more than one generation"):
        dc.calibrate(lambda: (ddim_loop(dc, call, 3), ddim_loop(dc, call, 3)), full_steps=2)
    with pytest.raises(ValueError, match="needs the three-graph split"):
        compile_deepcache(unet, branch=1, refresh="adaptive", split="pair")
    with pytest.raises(ValueError, match="needs pairs compiled with the three-graph split"):
        dc.with_schedule(AdaptiveRefresh())
    with pytest.raises(ValueError, match="refresh='calibrated' is not a refresh policy"):
        compile_deepcache(unet, branch=1, refresh="calibrated")
    with pytest.raises(ValueError, match="AdaptiveRefresh runs in Python only"):
        compile_deepcache(unet, branch=1, refresh=AdaptiveRefresh(lagged=True)).export("unused")
    with pytest.raises(ValueError, match="belongs to an explicit schedule of its own step count"):
        Schedule("explicit", steps=(0, 2), num_inference_steps=5, calibration=Calibration((1.0, 2.0), (8, 8)))


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
def test_adaptive_and_forecast_compiled_match_eager(backend):
    unet = make_unet("sd-mini")
    call = make_call(unet, batch=2)
    policy = AdaptiveRefresh(threshold=1.0, max_skip=2)
    compiled = compile_deepcache(unet, branch=1, refresh=policy, forecast=True, backend=backend)
    eager = compile_deepcache(unet, branch=1, refresh=policy, forecast=True)
    # 10 DDIM steps: per call the backends differ at rounding level (test_backends); the loop amplifies it.
    torch.testing.assert_close(ddim_loop(compiled, call, 10), ddim_loop(eager, call, 10), rtol=5e-4, atol=5e-4)
    assert compiled.history == eager.history and "S" in eager.history and eager.history.count("F") > 1


def test_calibrated_plan_exports_into_the_manifest(tmp_path):
    from deepcache_compile import load_deepcache

    unet = make_unet("sd-mini")
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=1)
    planned = dc.with_schedule(dc.calibrate(lambda: ddim_loop(dc, call, 6), full_steps=3))
    planned.export(tmp_path, format="pt2", example=call)
    engine = load_deepcache(tmp_path)
    assert engine.schedule == planned.deepcache_config.schedule  # steps and calibration, read back
    torch.testing.assert_close(ddim_loop(engine, call, 6), ddim_loop(planned, call, 6), rtol=1e-5, atol=1e-5)
    assert engine.history == planned.history
    with pytest.raises(ValueError, match="the plan was made for 6 steps"):
        ddim_loop(engine, call, 8)


def test_forecast_exports_and_the_engine_extrapolates_as_the_module_does(tmp_path):
    from deepcache_compile import load_deepcache
    from deepcache_compile.eval.digits import load_digits_model

    unet, scheduler = load_digits_model()
    dc = compile_deepcache(unet, branch=1, interval=3, forecast=True)
    dc.export(tmp_path, format="pt2", example={"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)},
              batch=(1, 4), height=(8, 32), width=(8, 32))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    engine = load_deepcache(tmp_path)
    ours, exported = (ddim_loop(m, {"sample": noise}, 10, scheduler) for m in (dc, engine))
    plain = ddim_loop(compile_deepcache(unet, branch=1, interval=3), {"sample": noise}, 10, scheduler)
    torch.testing.assert_close(exported, ours, rtol=1e-5, atol=1e-5)
    assert engine.history == "FSSFSSFSSF" and (ours - plain).abs().max() > 1e-3  # the extrapolation ran
