"""Published U-Net configs (random weights give the real architecture and latency) and example calls.

Nothing is downloaded: each preset is the config of a public checkpoint, typed in. The library's
`calls.example_call` builds the keyword arguments a pipeline passes to such a U-Net.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calls import example_call

__all__ = ["DTYPES", "PRESETS", "build_unet", "example_call"]

# The precisions the evaluation runs in, by the names its command line takes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # example_call re-exported: presets and their calls go together

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

PRESETS: dict[str, tuple[str, dict]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )),
    # stabilityai/stable-diffusion-2-1 unet/config.json
    "sd21": ("UNet2DConditionModel", dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        upcast_attention=True, norm_num_groups=32,
    )),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )),
    # google/ddpm-cifar10-32 unet/config.json
    "ddpm-cifar10": ("UNet2DModel", dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, attention_head_dim=None, norm_num_groups=32,
    )),
    # SD 1.x block layout at 1/10 width: for tests and quick smoke runs.
    "tiny-sd": ("UNet2DConditionModel", dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )),
}


def build_unet(preset: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Builds the U-Net of `preset` with seeded random weights, in eval mode.

    Example:
        >>> unet = build_unet("tiny-sd")
        >>> unet.config.block_out_channels
        (32, 64, 64, 64)
    """
    import diffusers

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown: choose one of {sorted(PRESETS)}")
    class_name, config = PRESETS[preset]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**config).to(dtype).eval()
