"""Tiny random-weight text-to-image pipelines, saved as `save_pretrained` writes them: what the serving tests and
`bench/serve.py --model text` serve. The tokenizers are made here from the letters (CLIP's BPE with no merges,
T5's unigram): nothing comes from a hub.

Example:
    >>> folder = save_tiny_pipeline("/tmp/sd-tiny")           # Stable Diffusion layout, 32 x 32 px by default
    >>> service = TextToImageService(ServeOptions(model=str(folder)))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .presets import PRESETS

__all__ = ["FAMILIES", "save_tiny_pipeline"]

FAMILIES = ("sd", "pixart", "sd3", "flux")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# PixArt-Sigma's transformer layout, narrow: 4 blocks, 8 x 8 latents (16 px), captions of 12 channels.
_PIXART = dict(sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
               out_channels=8, cross_attention_dim=16, caption_channels=12, norm_num_groups=1,
               use_additional_conditions=False)
# SD3's MMDiT, narrow: 4 joint blocks, 8 x 8 latents; text of 12 channels (two CLIP encoders of 6, no T5: the
# pipeline then gives zeros in its place), pooled text of 10 (two projections of 5).
_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=16)
# Flux.1-dev's layout, narrow: 1 dual- and 2 single-stream blocks, 2x2 latent patches packed into 16-channel tokens
# (4 x 4 tokens at 16 px), T5 text of 12 channels, CLIP's pooled text of 32, guidance embedded (one row per image).
_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(2, 2, 4))


def save_tiny_pipeline(folder: str | Path, family: str = "sd") -> Path:
    """Saves a seeded tiny pipeline of `family` in `folder`: "sd" (`StableDiffusionPipeline`: CLIP text encoder,
    the `tiny-sd` U-Net, DDIM; 32 x 32 px by default), "pixart" (`PixArtSigmaPipeline`: T5 encoder, a 4-block
    PixArt transformer, DPM-Solver++; 16 x 16 px, one token count) or "sd3" (`StableDiffusion3Pipeline`: two CLIP
    encoders with projections and no T5, a 4-block MMDiT, flow-matching Euler; 16 x 16 px) or "flux"
    (`FluxPipeline`: CLIP's pooled text and T5, a 1+2-block Flux transformer with guidance embedded, flow-matching
    Euler; 16 x 16 px served, its pipeline's default is larger)."""
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose one of {FAMILIES}")
    folder = Path(folder)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  norm_num_groups=8, shift_factor=0.0).eval()
    if family == "sd":
        tokenizer, text_encoder = _clip(folder)
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            unet=diffusers.UNet2DConditionModel(**{**PRESETS["tiny-sd"][1], "sample_size": 16}).eval(),
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    elif family == "sd3":
        (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = _clip(folder, 6, 5), _clip(folder, 6, 5, seed=2)
        torch.manual_seed(0)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**_SD3).eval(), vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    elif family == "flux":
        (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = _clip(folder), _t5()
        torch.manual_seed(0)
        pipe = diffusers.FluxPipeline(
            transformer=diffusers.FluxTransformer2DModel(**_FLUX).eval(), vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    else:
        tokenizer, text_encoder = _t5()
        torch.manual_seed(0)
        transformer = diffusers.PixArtTransformer2DModel(**_PIXART).eval()
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                             transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)
    return folder


def _clip(folder: Path, hidden: int = 32, projection: int | None = None, seed: int = 1):
    """A CLIP tokenizer of the letters (its vocabulary files written under `folder/vocab`) and a 2-layer encoder
    of `hidden` channels (with a `projection` of its pooled output: `CLIPTextModelWithProjection`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) for c in _LETTERS})
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt"),
                              model_max_length=8)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=projection or hidden)
    encoder = (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).eval()
    return tokenizer, encoder


def _t5():
    """A unigram T5 tokenizer of the letters and a 1-layer T5 encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    unigram = Tokenizer(models.Unigram(pieces + [(c, -3.0) for c in _LETTERS], unk_id=2))
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=unigram, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0)
    torch.manual_seed(1)
    encoder = T5EncoderModel(T5Config(vocab_size=30, d_model=12, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).eval()
    return tokenizer, encoder
