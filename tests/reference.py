"""A small eager reference of DeepCache for UNet2DConditionModel, written from the method's description.

It walks the U-Net's modules by hand (as the reference helper does), independently of the graph compiler:
skips are numbered conv_in = 0, then every down layer (resnet + attention) and downsampler in order. On a
shallow step it stops the down path after skip `branch`, skips the mid block and the up layers that consume
deeper skips, and feeds the cached main-branch input to the up layer that consumes skip `branch`.
"""

from __future__ import annotations

import torch


def _embed(unet, sample, timestep, ehs, added_cond_kwargs):
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added_cond_kwargs or {})
    return emb if aug is None else emb + aug


def _layer(block, i, h, emb, ehs):
    h = block.resnets[i](h, emb)
    if getattr(block, "attentions", None) is not None:
        h = block.attentions[i](h, encoder_hidden_states=ehs, return_dict=False)[0]
    return h


def num_skips(unet) -> int:
    return 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)


@torch.no_grad()
def deepcache_step(unet, sample, timestep, ehs, branch, cache=None, added_cond_kwargs=None):
    """One U-Net call: full when `cache` is None (returns the new cache), else shallow. -> (out, cache)."""
    shallow = cache is not None
    emb = _embed(unet, sample, timestep, ehs, added_cond_kwargs)
    h = unet.conv_in(sample)
    skips = [h]
    for block in unet.down_blocks:
        for i in range(len(block.resnets)):
            if shallow and len(skips) > branch:
                break
            h = _layer(block, i, h, emb, ehs)
            skips.append(h)
        if block.downsamplers and not (shallow and len(skips) > branch):
            h = block.downsamplers[0](h)
            skips.append(h)
    if not shallow:
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    idx = num_skips(unet) - 1
    for block in unet.up_blocks:
        for i in range(len(block.resnets)):
            if idx == branch:
                h, cache = (cache, cache) if shallow else (h, h)
            if idx <= branch or not shallow:
                h = torch.cat([h, skips[idx]], dim=1)
                h = _layer(block, i, h, emb, ehs)
            idx -= 1
        if block.upsamplers and (idx + 1 <= branch or not shallow):
            h = block.upsamplers[0](h)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h, cache
