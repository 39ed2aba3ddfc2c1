"""Flattening real U-Net calls into signatures and tensors, and tracing them."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile.calls import CallFlattener

from conftest import controlnet_residuals, make_call, make_unet, trace


def test_input_names_follow_the_call_structure():
    unet = make_unet("sdxl")
    call = make_call(unet)
    assert CallFlattener(unet)((), call).names == (
        "sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds",
        "added_cond_kwargs.time_ids",
    )
    sd = make_unet("sd")
    call = make_call(sd)
    call.update(controlnet_residuals(sd, call))
    names = CallFlattener(sd)((), call).names
    assert names[3] == "down_block_additional_residuals.0" and names[-1] == "mid_block_additional_residual"
    assert names[3:-1] == tuple(f"down_block_additional_residuals.{i}" for i in range(12))
    # A Python-number timestep and a non-tensor constant leave the names of the tensors as they are.
    ddpm = make_unet("ddpm-class")
    flat = CallFlattener(ddpm)((torch.randn(1, 3, 16, 16), 10), {"class_labels": torch.tensor([3])})
    assert flat.names == ("sample", "timestep", "class_labels") and len(flat.tensors) == 3


def test_signature_tracks_shapes_dtypes_and_optional_inputs():
    unet = make_unet("sd")
    flatten = CallFlattener(unet)
    call = make_call(unet)
    a = flatten((), call)
    assert flatten((), {**call, "class_labels": None}).signature == a.signature  # None = not given
    assert flatten((call["sample"], call["timestep"], call["encoder_hidden_states"]), {}).signature == a.signature
    assert flatten((), {**call, "sample": torch.randn(2, 4, 8, 8)}).signature != a.signature
    assert flatten((), {**call, "timestep": torch.tensor(5.0)}).signature != a.signature
    with_residuals = {**call, **controlnet_residuals(unet, call)}
    assert flatten((), with_residuals).signature != a.signature
    assert flatten((), {**call, "return_dict": False}).return_dict is False


def test_python_number_timestep_is_a_graph_input_not_a_constant():
    unet = make_unet("sd")
    call = {**make_call(unet), "timestep": 500}
    traced = trace(unet, call)
    ehs = call["encoder_hidden_states"]
    with torch.no_grad():
        for t in (500, 20):
            (out,) = traced.gm(call["sample"], torch.tensor(t), ehs)
            assert torch.equal(out, unet(call["sample"], t, encoder_hidden_states=ehs).sample)


def test_bad_call_names_the_signature():
    unet = make_unet("ddpm")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'encoder_hidden_states'.*forward signature is"):
        CallFlattener(unet)((torch.randn(1, 3, 16, 16),), {"timestep": 1, "encoder_hidden_states": 1})
