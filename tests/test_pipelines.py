"""`pipe.unet = compile_deepcache(pipe.unet, ...)` in real diffusers pipelines built from tiny configs.

Text encoders are left out: the pipelines take `prompt_embeds` directly. Each test checks the schedule the
pipeline actually ran, that a second generation is bitwise identical to the first (nothing leaks between
generations), and that the result differs from the plain U-Net's (the cache was used). With random weights
the size of that difference means nothing; closeness to the method is checked in test_dispatch.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from deepcache_compile import compile_deepcache

from conftest import make_unet


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()


def _sd_pipe(cls=StableDiffusionPipeline, scheduler=None):
    return cls(vae=_vae(), text_encoder=None, tokenizer=None, unet=make_unet("sd"),
               scheduler=scheduler or DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


def _embeds(dim, seed=0, length=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, dim, generator=gen), torch.randn(1, length, dim, generator=gen)


def _run(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def _check(pipe, run, expected_history, interval=3):
    plain = run()
    pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=interval)
    first = run()
    assert pipe.unet.history == expected_history
    second = run()
    assert pipe.unet.history == expected_history
    assert np.array_equal(first, second), "the second generation differs: state leaked between generations"
    assert not np.array_equal(first, plain)
    assert first.shape == plain.shape and np.isfinite(first).all()


def test_stable_diffusion_pipeline_with_cfg():
    pipe = _sd_pipe()
    pos, neg = _embeds(32)
    run = lambda: _run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=7,  # noqa: E731
                       guidance_scale=7.5, height=8, width=8)
    _check(pipe, run, "FSSFSSF")


def test_stable_diffusion_pipeline_plms_keeps_the_cadence():
    pipe = _sd_pipe(scheduler=PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True))
    pos, neg = _embeds(32)
    run = lambda: _run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=6,  # noqa: E731
                       height=8, width=8)
    # PLMS calls the U-Net num_inference_steps + 1 times, repeating one timestep.
    _check(pipe, run, "FSSFSSF")


def test_img2img_with_strength_starts_full():
    pipe = _sd_pipe(StableDiffusionImg2ImgPipeline)
    pos, neg = _embeds(32)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    run = lambda: _run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, image=image,  # noqa: E731
                       strength=0.5, num_inference_steps=10)
    _check(pipe, run, "FSSFS")


def test_text_to_image_then_img2img_does_not_leak():
    """A generation of another length right after the first still starts with a full step."""
    pipe = _sd_pipe()
    pos, neg = _embeds(32)
    pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=4)
    _run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=6, height=8, width=8)
    assert pipe.unet.history == "FSSSFS"
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    _run(img2img, prompt_embeds=pos, negative_prompt_embeds=neg, image=torch.zeros(1, 3, 8, 8),
         strength=0.5, num_inference_steps=6)
    assert pipe.unet.history == "FSS"


def test_stable_diffusion_xl_pipeline():
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=make_unet("sdxl"),
                                     scheduler=DDIMScheduler(num_train_timesteps=1000))
    pos, neg = _embeds(64)
    gen = torch.Generator().manual_seed(1)
    pooled, neg_pooled = torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)
    run = lambda: _run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg,  # noqa: E731
                       pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
                       num_inference_steps=5, height=8, width=8)
    _check(pipe, run, "FSSFS")


def test_ddim_pipeline_unconditional():
    pipe = DDIMPipeline(unet=make_unet("ddpm"), scheduler=DDIMScheduler(num_train_timesteps=1000))
    run = lambda: pipe(batch_size=2, num_inference_steps=6, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    _check(pipe, run, "FSFSFS", interval=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="enable_model_cpu_offload needs a CUDA device")
def test_model_cpu_offload_keeps_deepcache_across_generations():
    pipe = _sd_pipe()
    pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=3)
    pipe.enable_model_cpu_offload()
    pos, neg = _embeds(32)
    images = []
    for _ in range(2):
        images.append(_run(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=4, height=8,
                           width=8))
        assert pipe.unet.history == "FSSF"
    assert np.array_equal(images[0], images[1])
