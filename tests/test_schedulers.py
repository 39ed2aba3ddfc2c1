"""The C++ samplers (kernels/scheduler.cpp) against diffusers' own schedulers (DDIM, Euler, DPM-Solver++ and
flow-matching Euler): the same timesteps, the same initial-noise scale and the same trajectory under one
deterministic stand-in model, over every spacing, beta schedule, prediction type and step count the C++ side
accepts; and its refusals of what it does not implement."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

from deepcache_compile.artifacts.native import library_path, load_library

pytestmark = pytest.mark.skipif(not library_path().is_file(), reason="the native runtime is not built: run `make native`")

SPACINGS = ("leading", "trailing", "linspace")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
STEPS = (10, 16, 25, 50)
PREDICTIONS = {DDIMScheduler: ("epsilon", "v_prediction", "sample"),
               EulerDiscreteScheduler: ("epsilon", "v_prediction"),  # diffusers' Euler has no sample-prediction x0
               DPMSolverMultistepScheduler: ("epsilon", "v_prediction", "sample")}


def _model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: depends on both the input and the timestep."""
    return torch.tanh(0.5 * x + float(t) / 1000 - 0.5)


def _native(config: str, steps: int, sigmas=None, mu=None):
    """The C++ sampler for a config's JSON text, with set_timesteps' `sigmas` and `mu` where given."""
    load_library()
    options = {"sigmas": None if sigmas is None else [float(s) for s in sigmas], "mu": mu}
    return torch.classes.deepcache.Scheduler(config, steps, json.dumps(options))


def _compare(scheduler, steps: int, timestep_rtol: float = 0.0) -> None:
    scheduler.set_timesteps(steps)
    native = _native(scheduler.to_json_string(), steps)
    timesteps = native.timesteps()
    assert timesteps.dtype == scheduler.timesteps.dtype
    torch.testing.assert_close(timesteps, scheduler.timesteps, rtol=timestep_rtol, atol=0)
    assert native.init_noise_sigma() == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ours, theirs = noise * native.init_noise_sigma(), noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(_model(scheduler.scale_model_input(theirs, t), t), t, theirs).prev_sample
        ours = native.step(_model(native.scale_model_input(ours, i), timesteps[i]), i, ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", list(PREDICTIONS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_cpp_schedulers_equal_diffusers(cls, spacing):
    for betas, prediction, steps in itertools.product(BETAS, PREDICTIONS[cls], STEPS):
        scheduler = cls(timestep_spacing=spacing, beta_schedule=betas, prediction_type=prediction)
        try:
            _compare(scheduler, steps)
        except AssertionError as err:
            raise AssertionError(f"{cls.__name__} {betas} {prediction} {steps} steps: {err}") from None


@pytest.mark.parametrize("cls, config", [
    (DDIMScheduler, dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False)),  # SD 1.5's exported config
    (DDIMScheduler, dict(beta_schedule="scaled_linear", clip_sample_range=0.5, trained_betas=None)),
    (DDIMScheduler, dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())),
    (EulerDiscreteScheduler, dict(final_sigmas_type="sigma_min")),
    (EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear")),
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, beta_schedule="scaled_linear")),
    (DPMSolverMultistepScheduler, dict(solver_type="heun")),
    (DPMSolverMultistepScheduler, dict(solver_order=1)),
    (DPMSolverMultistepScheduler, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    (DPMSolverMultistepScheduler, dict(euler_at_final=True, lower_order_final=False)),
    (DPMSolverMultistepScheduler, dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)),
    (DPMSolverMultistepScheduler, dict(timestep_spacing="leading", steps_offset=1)),
], ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{k}" for k in v))
@pytest.mark.parametrize("steps", STEPS)
def test_cpp_scheduler_options_equal_diffusers(cls, config, steps):
    _compare(cls(**config), steps)


def test_euler_karras_sigmas_equal_diffusers():
    """Karras timesteps are fractional, found by interpolating log sigmas: numpy's float32 log differs from the
    correctly rounded one (C++) in the last bit for about 15 % of the table, so they agree to 1e-6, not bitwise."""
    for steps in STEPS:
        _compare(EulerDiscreteScheduler(use_karras_sigmas=True, beta_schedule="scaled_linear"), steps,
                 timestep_rtol=1e-6)


@pytest.mark.parametrize("config", [dict(), dict(shift=3.0), dict(shift=3.0, num_train_timesteps=500)],
                         ids=["default", "sd3", "500-timesteps"])
def test_cpp_flow_match_euler_equals_diffusers(config):
    """SD3's sampler (shift 3; diffusers shifts the training sigmas' ends and then the inference sigmas again):
    the same float32 timesteps bitwise and the same trajectory under the stand-in velocity model."""
    load_library()
    for steps in STEPS:
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        scheduler.set_timesteps(steps)
        native = _native(scheduler.to_json_string(), steps)
        assert native.init_noise_sigma() == 1.0  # the pipelines draw flow-matching noise unscaled
        _same_flow_trajectory(native, scheduler, steps)


def _same_flow_trajectory(native, scheduler, steps: int) -> None:
    """The same float32 timesteps bitwise, and the same trajectory bitwise under the stand-in velocity model."""
    assert torch.equal(native.timesteps(), scheduler.timesteps), steps
    ours = theirs = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(_model(theirs, t), t, theirs).prev_sample
        ours = native.step(_model(native.scale_model_input(ours, i), native.timesteps()[i]), i, ours)
    assert torch.equal(ours, theirs), steps


FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's scheduler_config.json


def _pipeline_sampling(model_class: str, scheduler, sample: tuple[int, ...], steps: int, model_config=None) -> dict:
    load_library()
    return json.loads(torch.ops.deepcache.pipeline_sampling(model_class, json.dumps(model_config or {}),
                                                            scheduler.to_json_string(), list(sample), steps))


@pytest.mark.parametrize("config", [FLUX_SCHEDULER, {**FLUX_SCHEDULER, "time_shift_type": "linear"},
                                    {**FLUX_SCHEDULER, "use_dynamic_shifting": False}],
                         ids=["flux", "linear-shift", "fixed-shift"])
def test_cpp_flux_pipeline_sampling_equals_fluxpipeline(config):
    """FluxPipeline sets its sampler with sigmas linspace(1, 1/N, N) and mu from the packed latents' token count
    (calculate_shift), and divides the timestep by 1000: pipeline_sampling computes the same arguments, and the C++
    sampler set with them gives diffusers' timesteps and trajectory bitwise, for 64 to 4096 tokens."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    for tokens, steps in itertools.product((64, 256, 1024, 4096), STEPS):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        sampling = _pipeline_sampling("FluxTransformer2DModel", scheduler, (1, tokens, 64), steps)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        assert sampling["mu"] == mu and sampling["timestep_divisor"] == 1000
        sigmas = np.linspace(1.0, 1 / steps, steps)
        assert sampling["sigmas"] == sigmas.tolist()
        retrieve_timesteps(scheduler, steps, sigmas=sigmas, mu=mu)  # FluxPipeline.__call__'s own call
        _same_flow_trajectory(_native(scheduler.to_json_string(), steps, sampling["sigmas"], sampling["mu"]),
                              scheduler, steps)


def test_cpp_sd3_dynamic_shift_equals_stable_diffusion3_pipeline():
    """StableDiffusion3Pipeline with use_dynamic_shifting: mu from (height // patch) * (width // patch) of the
    latents, the scheduler's own sigmas (shifted dynamically, in float64 as numpy does), the timestep unscaled."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    for side, steps in itertools.product((32, 64, 128), STEPS):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        sampling = _pipeline_sampling("SD3Transformer2DModel", scheduler, (1, 16, side, side), steps,
                                      {"patch_size": 2})
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)
        assert sampling == {"sigmas": [], "mu": mu, "timestep_divisor": 1.0}
        scheduler.set_timesteps(steps, mu=mu)
        _same_flow_trajectory(_native(scheduler.to_json_string(), steps, mu=mu), scheduler, steps)


def _config(cls, **changes) -> dict:
    return {**json.loads(cls().to_json_string()), **changes}


@pytest.mark.parametrize("config, steps, message", [
    (_config(DDPMScheduler), 10, "scheduler DDPMScheduler is not implemented in C\\+\\+ \\(it implements "
     "DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler\\)"),
    (_config(FlowMatchEulerDiscreteScheduler, use_dynamic_shifting=True), 10,
     "FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=true needs the pipeline's mu"),
    (_config(FlowMatchEulerDiscreteScheduler, stochastic_sampling=True), 10,
     "stochastic_sampling=true is not implemented by the C\\+\\+ FlowMatchEulerDiscreteScheduler"),
    (_config(DDIMScheduler, thresholding=True), 10,
     "scheduler config thresholding=true is not implemented by the C\\+\\+ DDIMScheduler \\(it runs thresholding=false\\)"),
    (_config(DDIMScheduler, brand_new_option=1), 10,
     "scheduler config key 'brand_new_option' is not implemented by the C\\+\\+ DDIMScheduler"),
    (_config(DDIMScheduler, timestep_spacing="karras"), 10,
     'scheduler config timestep_spacing="karras" is not implemented by the C\\+\\+ DDIMScheduler \\(it implements '
     "leading, trailing, linspace\\)"),
    (_config(DPMSolverMultistepScheduler, solver_order=3), 10, "solver_order=3 is not implemented"),
    (_config(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++"), 10,
     'algorithm_type="sde-dpmsolver\\+\\+" is not implemented'),
    (_config(EulerDiscreteScheduler, use_exponential_sigmas=True), 10,
     "use_exponential_sigmas=true is not implemented by the C\\+\\+ EulerDiscreteScheduler"),
    (_config(DDIMScheduler), 0, "steps=0: a generation needs 1 step or more"),
    (_config(DDIMScheduler), 1001, "steps=1001 is more than the scheduler's 1000 training timesteps"),
])
def test_what_the_cpp_schedulers_do_not_implement_is_refused_by_name(config, steps, message):
    with pytest.raises(ValueError, match=message):  # std::invalid_argument reaches Python as ValueError
        _native(json.dumps(config), steps)


def test_custom_sigmas_are_refused_where_the_sampler_does_not_take_them():
    """A Flux export run with --scheduler set to a DDIM config: FluxPipeline's custom sigmas have no meaning there."""
    sampling = _pipeline_sampling("FluxTransformer2DModel", DDIMScheduler(), (1, 64, 64), 10)
    with pytest.raises(ValueError, match="this model's pipeline passes custom sigmas / mu to its sampler, which the "
                                         "C\\+\\+ DDIMScheduler does not take"):
        _native(DDIMScheduler().to_json_string(), 10, sampling["sigmas"], sampling["mu"])
    with pytest.raises(ValueError, match="5 custom sigmas for 10 steps"):
        _native(FlowMatchEulerDiscreteScheduler().to_json_string(), 10, [1.0, 0.8, 0.6, 0.4, 0.2])


def test_other_schedulers_keys_are_ignored_as_diffusers_ignores_them():
    """EulerDiscreteScheduler.from_config(a DDIM or PNDM config) keeps that config's own keys (clip_sample,
    set_alpha_to_one, skip_prk_steps); diffusers' Euler ignores them, and so does the C++ one."""
    load_library()
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}  # SD 1.5's scheduler_config.json
    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        scheduler = cls.from_config(sd15)
        assert "skip_prk_steps" in json.loads(scheduler.to_json_string())
        _compare(scheduler, 20)


def test_python_json_infinity_is_read():
    """diffusers writes DPMSolverMultistepScheduler's default lambda_min_clipped as the bare word -Infinity."""
    load_library()
    text = DPMSolverMultistepScheduler().to_json_string()
    assert "-Infinity" in text
    reference = DPMSolverMultistepScheduler()
    reference.set_timesteps(20)
    assert torch.equal(_native(text, 20).timesteps(), reference.timesteps)
