"""The dispatcher: DDIM loops against the eager reference DeepCache, generation boundaries, call slots."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler, PNDMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from deepcache_compile import compile_deepcache

from conftest import make_call, make_unet
from reference import deepcache_step


def _ddim_loop(model_call, latents, steps=10):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        noise = model_call(latents, t)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("arch, branch, interval", [
    ("sd", 0, 3), ("sd", 1, 5), ("sd", 3, 2), ("sd", 5, 4), ("sd", 11, 2), ("sdxl", 1, 5), ("sdxl", 8, 3),
], ids=lambda v: str(v))
def test_ddim_loop_matches_eager_reference(arch, branch, interval):
    unet = make_unet(arch)
    call = make_call(unet, batch=2)
    ehs, added = call["encoder_hidden_states"], call.get("added_cond_kwargs")
    dc = compile_deepcache(unet, branch=branch, interval=interval)

    state = {"step": 0, "cache": None}

    def reference(x, t):
        cache = None if state["step"] % interval == 0 else state["cache"]
        out, state["cache"] = deepcache_step(unet, x, t, ehs, branch, cache, added)
        state["step"] += 1
        return out

    def compiled(x, t):
        return dc(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample

    expected = _ddim_loop(reference, call["sample"])
    actual = _ddim_loop(compiled, call["sample"])
    # Eager fp32 on both sides, the same ops in the same order: the tolerance is float rounding only.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    plain = _ddim_loop(lambda x, t: unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample,
                       call["sample"])
    assert not torch.allclose(actual, plain, atol=1e-6), "DeepCache must actually reuse the cache"


def _counting(dc):
    """Records, per call, whether the dispatcher ran the full graph."""
    log = []
    pair_run = dc.prepare

    def wrap(pair):
        full, shallow = pair.full, pair.shallow
        object.__setattr__(pair, "full", lambda *a: (log.append("F"), full(*a))[1])
        object.__setattr__(pair, "shallow", lambda *a: (log.append("S"), shallow(*a))[1])
        return pair

    return log, lambda **call: wrap(pair_run(**call))


def test_new_generation_starts_full_when_the_timestep_goes_up():
    unet = make_unet("sd")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1, interval=3)
    log, prepare = _counting(dc)
    prepare(**call)
    for _ in range(2):  # two generations of 4 steps, nothing between them
        for t in (900, 700, 500, 300):
            dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    assert "".join(log) == "FSSF" * 2


def test_signature_change_starts_a_new_generation_and_reset_works():
    unet = make_unet("sd")
    small, large = make_call(unet), make_call(unet, height=16, width=16)
    dc = compile_deepcache(unet, branch=1, interval=3)
    log_small, prep = _counting(dc)
    prep(**small)
    log_large, _ = _counting(dc)
    for t in (900, 800):
        dc(small["sample"], t, encoder_hidden_states=small["encoder_hidden_states"])
    out = dc(large["sample"], 700, encoder_hidden_states=large["encoder_hidden_states"]).sample
    assert out.shape == large["sample"].shape
    dc(small["sample"], 600, encoder_hidden_states=small["encoder_hidden_states"])
    assert "".join(log_small) == "FSF"  # back to the small size: a new generation, full again
    dc(small["sample"], 500, encoder_hidden_states=small["encoder_hidden_states"])
    dc.reset()
    dc(small["sample"], 400, encoder_hidden_states=small["encoder_hidden_states"])
    assert "".join(log_small) == "FSFSF"


def test_exception_mid_generation_does_not_leak_the_cache():
    unet = make_unet("sd")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1, interval=5)
    log, prep = _counting(dc)
    prep(**call)
    for t in (900, 800):
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    with pytest.raises(TypeError):
        dc(call["sample"], 700, encoder_hidden_states=call["encoder_hidden_states"], bogus=1)
    for t in (900, 800):  # the next generation starts from the top
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    assert "".join(log) == "FSFS"


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, HeunDiscreteScheduler], ids=["pndm", "heun"])
def test_repeated_timesteps_keep_a_regular_cadence(scheduler_cls):
    unet = make_unet("sd")
    call = make_call(unet)
    scheduler = scheduler_cls(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    assert len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps)  # the schedule repeats
    dc = compile_deepcache(unet, branch=1, interval=3)
    log, prep = _counting(dc)
    prep(**{**call, "timestep": scheduler.timesteps[0]})  # Heun's timesteps are float: its own signature
    for t in scheduler.timesteps:
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    n = len(scheduler.timesteps)
    assert "".join(log) == "".join("F" if i % 3 == 0 else "S" for i in range(n))


def test_two_calls_per_step_keep_one_cache_each():
    unet = make_unet("sd")
    cond, uncond = make_call(unet, seed=0), make_call(unet, seed=1)
    dc = compile_deepcache(unet, branch=1, interval=3, calls_per_step=2)
    interval, outs, refs = 3, [], []
    caches = [None, None]
    for step, t in enumerate((900, 800, 700, 600)):
        for slot, c in enumerate((cond, uncond)):
            outs.append(dc(c["sample"], t, encoder_hidden_states=c["encoder_hidden_states"]).sample)
            cache = None if step % interval == 0 else caches[slot]
            out, caches[slot] = deepcache_step(unet, c["sample"], torch.tensor(t), c["encoder_hidden_states"],
                                               1, cache)
            refs.append(out)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_return_types_and_attribute_proxy():
    unet = make_unet("sd")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=2)
    assert isinstance(dc(**call), UNet2DConditionOutput)
    assert isinstance(dc(**call, return_dict=False), tuple)
    assert dc.config is unet.config and dc.dtype == unet.dtype and dc.device == unet.device
    assert dc.deepcache_config.schedule.interval == 3  # the documented default
    ddpm = make_unet("ddpm")
    out = compile_deepcache(ddpm, branch=1)(**make_call(ddpm))
    assert isinstance(out, UNet2DOutput)


def test_timestep_forms_0d_1d_and_python_number():
    unet = make_unet("sd")
    call = make_call(unet, batch=2)
    ehs = call["encoder_hidden_states"]
    dc = compile_deepcache(unet, branch=1, interval=2)
    expected = unet(call["sample"], 500, encoder_hidden_states=ehs).sample
    for t in (500, torch.tensor(500), torch.tensor([500, 500]), 500.0):
        dc.reset()
        out = dc(call["sample"], t, encoder_hidden_states=ehs).sample
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bounded_signature_cache():
    unet = make_unet("sd")
    dc = compile_deepcache(unet, branch=0, max_signatures=2)
    for size in (8, 16, 24):
        dc(**make_call(unet, height=size, width=size))
    assert len(dc._pairs) == 2


def test_the_user_unet_is_not_modified():
    unet = make_unet("sd")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    forward = unet.forward
    dc = compile_deepcache(unet, branch=1, interval=2)
    call = make_call(unet)
    for t in (900, 800, 700):
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    assert unet.forward == forward and not unet.training
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("branch", [0, 1, 4])
def test_matches_the_pypi_reference_helper(branch):
    """DEEPCACHE.md: branch=b equals DeepCacheSDHelper.set_params(cache_branch_id=b) for two-layer blocks."""
    DeepCache = pytest.importorskip("DeepCache", reason="PyPI DeepCache (the reference helper) is not installed")
    from types import SimpleNamespace

    unet = make_unet("sd")
    call = make_call(unet, batch=2)
    ehs = call["encoder_hidden_states"]
    dc = compile_deepcache(unet, branch=branch, interval=3)
    ours = _ddim_loop(lambda x, t: dc(x, t, encoder_hidden_states=ehs).sample, call["sample"])

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    helper = DeepCache.DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        latents = call["sample"]
        with torch.no_grad():
            for t in scheduler.timesteps:
                latents = scheduler.step(unet(latents, t, encoder_hidden_states=ehs).sample, t, latents).prev_sample
    finally:
        helper.disable()
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)
