"""Skip discovery from the graph and `list_branches` with FlopCounterMode MACs."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import list_branches
from deepcache_compile.calls import example_call
from deepcache_compile.eval.presets import build_unet
from deepcache_compile.graph.macs import node_macs

from conftest import EXPECTED_SKIPS, controlnet_residuals, make_call, make_svd_unet_and_call, make_unet, trace
from test_partition import _assert_exact_for_all_branches


def _sd15_attention_macs_by_hand(text_tokens: int = 77) -> int:
    """Attention products of SD 1.5 at 512 px, batch 1, from the architecture alone.

    An attention over s_q queries and s_k keys with h heads of size d costs s_q*s_k*d MACs per head for Q K^T
    and the same for the weighted sum of V: 2 * s_q * s_k * (h*d) = 2 * s_q * s_k * C. Each transformer has one
    self-attention (s_k = s_q = H*W) and one cross-attention (s_k = 77 text tokens). SD 1.5 has transformers at
    64x64 (320 ch: 2 down + 3 up), 32x32 (640 ch: 2 + 3), 16x16 (1280 ch: 2 + 3) and 8x8 (1280 ch: 1 in the mid).
    """
    levels = [(64 * 64, 320, 5), (32 * 32, 640, 5), (16 * 16, 1280, 5), (8 * 8, 1280, 1)]
    return sum(n * (2 * s * s * c + 2 * s * text_tokens * c) for s, c, n in levels)


def test_sd15_at_512px_matches_the_papers_macs(sd15_unet):
    call = example_call(sd15_unet)  # 64x64 latent = 512 px, batch 1
    rows = list_branches(sd15_unet, **call)
    assert [r.index for r in rows] == list(range(12))
    traced = trace(sd15_unet, call)
    macs = node_macs(traced.gm, traced.example_inputs)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    counted = sum(macs[n.name] for n in traced.gm.graph.nodes if n.target == sdpa)
    attention = _sd15_attention_macs_by_hand()
    assert attention == 63_026_135_040 and counted == attention
    # The paper's 338.83 G counts convolutions and linear layers, not the attention products.
    assert rows[0].full_macs - attention == pytest.approx(338.83e9, rel=0.002)
    # docs/method.md: about 7.9 %, 22.4 %, 38 %, 47 % for branches 0..3
    for branch, share in {0: 0.079, 1: 0.224, 2: 0.38, 3: 0.47}.items():
        assert rows[branch].mac_share == pytest.approx(share, abs=0.01)
    shares = [r.mac_share for r in rows]
    assert shares == sorted(shares) and shares[-1] < 1
    assert rows[0].producer_module == "conv_in" and rows[0].consumer_module == "up_blocks.3.resnets.2"
    assert rows[1].producer_module == "down_blocks.0.attentions.0"
    assert rows[1].consumer_module == "up_blocks.3.resnets.1"
    assert rows[3].producer_module == "down_blocks.0.downsamplers.0" and rows[3].cache_shape == (1, 640, 32, 32)


@pytest.mark.parametrize("arch", ["sd", "ddpm"])  # sdxl: test_default_example_call_and_sdxl_layout
def test_branch_counts(arch):
    unet = make_unet(arch)
    rows = list_branches(unet, **make_call(unet))
    assert len(rows) == EXPECTED_SKIPS[arch]
    assert rows[0].producer_module == "conv_in"


def test_default_example_call_and_sdxl_layout():
    rows = list_branches(make_unet("sdxl"))
    assert len(rows) == 9
    assert rows[8].consumer_module == "up_blocks.0.resnets.0" and rows[8].producer_module == "down_blocks.2.attentions.1"


def test_controlnet_call_keeps_the_numbering():
    unet = make_unet("sd")
    call = make_call(unet)
    plain = list_branches(unet, **call)
    call.update(controlnet_residuals(unet, call))
    with_residuals = list_branches(unet, **call)
    assert [(r.index, r.consumer_module, r.cache_shape) for r in with_residuals] == \
           [(r.index, r.consumer_module, r.cache_shape) for r in plain]


def test_stable_video_diffusion_unet_splits_exactly():
    unet, call = make_svd_unet_and_call()
    branches = _assert_exact_for_all_branches(unet, call)
    assert len(branches) == 4
    assert branches[0].cache_shape == (3, 32, 8, 8)  # frames are folded into the batch


def test_preset_builds_the_published_architecture():
    with torch.device("meta"):  # the architecture only: no 2.6 B random weights to initialise
        unet = build_unet("sdxl", dtype=torch.bfloat16)
    assert unet.add_embedding.linear_1.in_features == 2816 and unet.dtype == torch.bfloat16
