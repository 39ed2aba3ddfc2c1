"""Tiny U-Nets built from configs (seeded random weights) and helpers shared by the tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from deepcache_compile.calls import CallFlattener, example_call
from deepcache_compile.eval.presets import build_unet
from deepcache_compile.graph.trace import TracedUNet, trace_unet

# Two cores: one process uses both; under pytest-xdist (`-n 2`) each worker uses one, so that the workers'
# OpenMP threads never outnumber the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# The suite checks graphs and their numbers, not gcc's optimizer: Inductor's and AOTInductor's generated C++ is
# built at -O0 here (Inductor's own switch), which takes about 40 % off their compile times on this machine;
# same generated code, no FMA contraction (within every compiled-vs-eager tolerance). `bench/` compiles with
# Inductor's defaults (-O3).
os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")
# Each worker gets a temp folder of its own: the tests that check that nothing is left in the temp folder see
# their own worker's files only, not the other worker's compile in progress. Inductor's cache stays where it is
# by default (it is under the temp folder), shared by the workers and kept between runs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
tempfile.tempdir = tempfile.mkdtemp(prefix=f"dc-tests-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, tempfile.tempdir, ignore_errors=True)

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

TINY_CONFIGS = {
    # SD 1.x block layout (12 skips), narrow.
    "sd": (UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )),
    # SD 2.1 features: linear projections, per-block head counts, upcast attention.
    "sd21": (UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=48, attention_head_dim=(2, 4, 4, 4),
        use_linear_projection=True, upcast_attention=True, norm_num_groups=16,
    )),
    # SDXL narrowed in width: same block layout, transformer depths (1, 2, 10) and text_time conditions.
    "sdxl": (UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=16,
    )),
    # Two-block SD-style and SDXL-style U-Nets: for the slow paths (compilers, exporters).
    "sd-mini": (UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )),
    "sdxl-mini": (UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=16,
    )),
    # DDPM CIFAR-10 layout, narrow.
    "ddpm": (UNet2DModel, dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )),
    # Class-conditional DDPM.
    "ddpm-class": (UNet2DModel, dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=10,
    )),
    # The smallest U-Net with the DeepCache structure (two blocks of one resnet, the mid block's attention): for
    # tests about what surrounds compiling (the compile cache), where the model only has to be one.
    "micro": (UNet2DModel, dict(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )),
}

# Skips per architecture: 1 (conv_in) + layers_per_block per block + one per downsampler.
EXPECTED_SKIPS = {"sd": 12, "sd21": 12, "sdxl": 9, "sd-mini": 6, "sdxl-mini": 6, "ddpm": 12, "ddpm-class": 4,
                  "micro": 4}


def make_unet(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cls, config = TINY_CONFIGS[name]
    torch.manual_seed(0)
    return cls(**config).to(dtype).eval()


def make_call(unet: torch.nn.Module, batch: int = 1, seed: int = 0, **size) -> dict:
    return example_call(unet, batch=batch, text_len=7, seed=seed, **size)


def trace(unet: torch.nn.Module, call: dict) -> TracedUNet:
    """`trace_unet` for keyword arguments of one call."""
    return trace_unet(unet, CallFlattener(unet)((), call))


def controlnet_residuals(unet, call: dict, seed: int = 1) -> dict:
    """ControlNet-style extra inputs: one residual per skip and one for the mid block, shaped from a real run."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(o.shape))]
    for block in unet.down_blocks:
        for layer in (*block.resnets, *(block.downsamplers or [])):
            hooks.append(layer.register_forward_hook(lambda m, i, o: shapes.append(o.shape)))
    mid = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    with torch.no_grad():
        unet(**call)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    return dict(
        down_block_additional_residuals=tuple(torch.randn(s, generator=gen) for s in shapes),
        mid_block_additional_residual=torch.randn(mid[0], generator=gen),
    )


@pytest.fixture(scope="session")
def sd15_unet():
    """The real SD 1.5 architecture (860M parameters, random weights); share it, it takes ~10 s to build."""
    return build_unet("sd15")


def make_svd_unet_and_call():
    """A narrow UNetSpatioTemporalConditionModel (SVD layout) and one call (batch 1, 3 frames)."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=(2, 4), addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        transformer_layers_per_block=1,
    ).eval()
    gen = torch.Generator().manual_seed(0)
    call = dict(sample=torch.randn(1, 3, 8, 8, 8, generator=gen), timestep=torch.tensor(10.0),
                encoder_hidden_states=torch.randn(1, 1, 32, generator=gen),
                added_time_ids=torch.randn(1, 3, generator=gen))
    return unet, call


# Tiny diffusion transformers of each family the block-range cut serves (text length 5 != image tokens 16, so
# that the image and text streams differ in shape).
def make_transformer(family: str, **overrides) -> torch.nn.Module:
    """A tiny random transformer of `family`; `overrides` replace entries of its config."""
    import diffusers

    configs = {
        "dit": (diffusers.DiTTransformer2DModel, dict(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)),
        "pixart": (diffusers.PixArtTransformer2DModel, dict(
            sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            out_channels=8, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
            use_additional_conditions=False)),
        "sd3": (diffusers.SD3Transformer2DModel, dict(
            sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=16)),
        "flux": (diffusers.FluxTransformer2DModel, dict(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))),
        "wan": (diffusers.WanTransformer3DModel, dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=12, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32)),
    }
    if family not in configs:
        raise ValueError(family)
    cls, config = configs[family]
    torch.manual_seed(0)
    return cls(**{**config, **overrides}).eval()


TRANSFORMER_FAMILIES = ("dit", "pixart", "sd3", "flux", "wan")


def make_transformer_call(family: str, batch: int = 2, seed: int = 1, timestep: float = 500) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    t = torch.full((batch,), float(timestep))
    if family == "dit":
        return dict(hidden_states=randn(batch, 4, 8, 8), timestep=t.long(), class_labels=torch.arange(batch) % 10)
    if family == "pixart":
        return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, 5, 12), timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "sd3":
        return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, 5, 12),
                    pooled_projections=randn(batch, 10), timestep=t)
    if family == "flux":
        return dict(hidden_states=randn(batch, 16, 8), encoder_hidden_states=randn(batch, 5, 12),
                    pooled_projections=randn(batch, 10), timestep=t / 1000, img_ids=torch.zeros(16, 3),
                    txt_ids=torch.zeros(5, 3))
    return dict(hidden_states=randn(batch, 4, 2, 8, 8), encoder_hidden_states=randn(batch, 5, 12), timestep=t)


# The fast lane (`make test-fast`, `pytest -m "not slow"`; under 3 minutes here): no compiler backend, no C++
# build, no SD-size layout, one case of each feature. A test is slow when its module is about compiled or
# deployed artifacts, or its id names a compiling backend, an SD/SDXL-size layout (they run the same code as the
# tiny ones, at 7-26 s each here), an export, or a further case of a sweep the fast lane runs once.
_SLOW_MODULES = {"test_attention", "test_backends", "test_benchmark", "test_cli", "test_compile_cache", "test_dynamic",
                 "test_export", "test_native", "test_quality", "test_ray_serve", "test_soak", "test_weights", "test_pipelines"}
_SLOW_WORDS = ("inductor", "aoti", "onnx", "tensorrt", "native", "sd15", "sdxl-real", "compiled",
               "[sd]", "[sd21]", "[sdxl", "sdxl_layout", "branch_counts[sd", "export", "half_precision",
               "controlnet", "lcm_style", "eight_threads", "from_one_recorded", "[calibrated]", "[adaptive]",
               "[forecast]", "in_the_wrapper_and_the_engine", "int8_kernels", "int8_deepcache_costs",
               "alone[pixart]", "alone[sd3]", "generation_batching", "before_its_group", "text_service_from_engine", "serves_engine_files",
               "transformer[sd3]", "size_bitwise[flux]", "size_bitwise[sd3]", "run_alone[generation]",
               "no_vnni[true]", "no_vnni[false]")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        if module in _SLOW_MODULES or any(word in item.nodeid.lower() for word in _SLOW_WORDS):
            item.add_marker(pytest.mark.slow)
