"""The public contract and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepcache_compile import compile_deepcache
from deepcache_compile.graph.cuts import CutNotFoundError
from deepcache_compile.graph.trace import UNetTraceError

from conftest import make_call, make_unet


def test_public_contract_as_written():
    unet = make_unet("ddpm-class")
    dc = compile_deepcache(unet, branch=1, interval=5)
    assert dc.full_steps(50) == list(range(0, 50, 5))
    dc = compile_deepcache(unet, branch=1, interval=5, schedule="nonuniform", num_inference_steps=50,
                           center=15, power=1.4)
    assert dc.full_steps(50) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    dc = compile_deepcache(unet, branch=1, schedule=[0, 3, 7, 12])
    assert dc.full_steps(20) == [0, 3, 7, 12]
    assert compile_deepcache(unet, branch=2).full_steps(7) == [0, 3, 6]
    dc.reset()
    assert dc.step == 0


def test_branch_out_of_range_names_the_valid_range():
    unet = make_unet("sd")
    dc = compile_deepcache(unet, branch=12)
    with pytest.raises(ValueError, match=r"branch=12 is out of range for this U-Net: valid branches are 0\.\.11 "
                                         r"\(see list_branches\(unet\)\)"):
        dc(**make_call(unet))


@pytest.mark.parametrize("kwargs, message", [
    (dict(branch=-1), "branch=-1 is invalid"),
    (dict(branch=1, interval=0), "interval=0 is invalid"),
    (dict(branch=1, schedule=[2, 5]), "must start at 0"),
    (dict(branch=1, schedule=[0, 60], num_inference_steps=50), "full step 60 is out of range"),
    (dict(branch=1, schedule=[0, 3], interval=2), "either interval"),
    (dict(branch=1, schedule="nonuniform", interval=5), "needs num_inference_steps"),
    (dict(branch=1, calls_per_step=0), "calls_per_step=0"),
], ids=["negative-branch", "interval0", "list-start", "list-range", "list-and-interval", "nonuniform-T",
        "calls-per-step"])
def test_bad_configuration_is_refused_at_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compile_deepcache(make_unet("ddpm-class"), **kwargs)


def test_mismatched_cache_is_refused():
    unet = make_unet("sd")
    call = make_call(unet)
    pair = compile_deepcache(unet, branch=1).prepare(**call)
    tensors = (call["sample"], call["timestep"], call["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"cache of shape \(1, 32, 4, 4\).*does not match"):
        pair.run_shallow(*tensors, cache=torch.zeros(1, 32, 4, 4))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep):
        if sample.mean() > 0:  # control flow on a tensor value: not traceable into one graph
            return (self.conv(sample),)
        return (sample,)


def test_untraceable_unet_error_names_the_cause_and_the_fix():
    dc = compile_deepcache(_DataDependent(), branch=0)
    with pytest.raises(UNetTraceError, match=r"(?s)torch.export could not trace this U-Net.*test_api.py:\d+ in forward.*torch.cond"):
        dc(torch.randn(1, 4, 8, 8), 10)


class _NoSkips(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep):
        return (self.conv(sample) * timestep,)


def test_network_without_skip_connections_is_refused():
    dc = compile_deepcache(_NoSkips(), branch=0)
    with pytest.raises(CutNotFoundError, match=r"unet-skips \(U-Net skip connections: channel concatenations.*transformer-blocks"):
        dc(torch.randn(1, 4, 8, 8), 10)


def test_dynamic_is_normalized_once_in_the_config():
    from deepcache_compile import DeepCacheConfig

    assert DeepCacheConfig(branch=1, dynamic=True).dynamic == {}
    assert DeepCacheConfig(branch=1, dynamic=False).dynamic is None
    assert DeepCacheConfig(branch=1, dynamic={"batch": [1, 4]}).dynamic == {"batch": (1, 4)}
    with pytest.raises(TypeError, match="pass True, False, or a dict"):
        DeepCacheConfig(branch=1, dynamic="yes")
