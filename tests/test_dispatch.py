"""The dispatcher: DDIM loops against the eager reference DeepCache, generation boundaries, call slots."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler, PNDMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.sampling import ddim_loop

from conftest import make_call, make_unet
from reference import deepcache_step


def _ddim_loop(model_call, latents, steps=10):
    """`ddim_loop` for a function `(latents, t) -> noise prediction`."""
    return ddim_loop(lambda x, t: SimpleNamespace(sample=model_call(x, t)), {"sample": latents}, steps)


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


def test_new_generation_starts_full_when_the_timestep_goes_up():
    unet = make_unet("sd")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1, interval=3)
    for _ in range(2):  # two generations of 4 steps, nothing between them
        for t in (900, 700, 500, 300):
            dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
        assert dc.history == "FSSF"


def test_signature_change_starts_a_new_generation_and_reset_works():
    unet = make_unet("sd")
    small, large = make_call(unet), make_call(unet, height=16, width=16)
    dc = compile_deepcache(unet, branch=1, interval=3)
    for t in (900, 800):
        dc(small["sample"], t, encoder_hidden_states=small["encoder_hidden_states"])
    assert dc.history == "FS"
    out = dc(large["sample"], 700, encoder_hidden_states=large["encoder_hidden_states"]).sample
    assert out.shape == large["sample"].shape and dc.history == "F"  # new signature: a new generation
    dc(small["sample"], 600, encoder_hidden_states=small["encoder_hidden_states"])
    dc(small["sample"], 500, encoder_hidden_states=small["encoder_hidden_states"])
    assert dc.history == "FS"  # back to the small size: a new generation, full again
    dc.reset()
    dc(small["sample"], 400, encoder_hidden_states=small["encoder_hidden_states"])
    assert dc.history == "F" and dc.step == 1


def test_exception_mid_generation_does_not_leak_the_cache():
    unet = make_unet("sd")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1, interval=5)
    for t in (900, 800):
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    with pytest.raises(TypeError, match="bogus"):
        dc(call["sample"], 700, encoder_hidden_states=call["encoder_hidden_states"], bogus=1)
    assert dc.history == "FS" and dc.step == 2  # the failed call did not count
    for t in (900, 800):  # the next generation starts from the top
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    assert dc.history == "FS"


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, HeunDiscreteScheduler], ids=["pndm", "heun"])
def test_repeated_timesteps_keep_a_regular_cadence(scheduler_cls):
    unet = make_unet("sd")
    call = make_call(unet)
    scheduler = scheduler_cls(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    assert len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps)  # the schedule repeats
    dc = compile_deepcache(unet, branch=1, interval=3)
    for t in scheduler.timesteps:
        dc(call["sample"], t, encoder_hidden_states=call["encoder_hidden_states"])
    n = len(scheduler.timesteps)
    assert dc.history == "".join("F" if i % 3 == 0 else "S" for i in range(n))


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
    assert [p.traced.example_inputs[0].shape[-1] for p in dc.pairs] == [16, 24]  # the least recent went


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
    """docs/method.md: branch=b equals DeepCacheSDHelper.set_params(cache_branch_id=b) for two-layer blocks."""
    DeepCache = pytest.importorskip("DeepCache", reason="PyPI DeepCache (the reference helper) is not installed")
    unet = make_unet("sd")
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=branch, interval=3)
    ours = ddim_loop(dc, call, 10)

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)  # the helper looks each timestep up here; ddim_loop's has the same ones
    helper = DeepCache.DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = ddim_loop(unet, call, 10)
    finally:
        helper.disable()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
