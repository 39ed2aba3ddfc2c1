"""Flattening real U-Net calls into signatures and tensors, and tracing them."""

from __future__ import annotations

import torch

from deepcache_compile.trace import CallFlattener, trace_unet

from conftest import controlnet_residuals, make_call, make_unet


def test_input_names_follow_the_call_structure():
    unet = make_unet("sdxl")
    call = make_call(unet)
    assert CallFlattener(unet).input_names((), call) == (
        "sample", "timestep", "encoder_hidden_states", "added_cond_kwargs.text_embeds",
        "added_cond_kwargs.time_ids",
    )
    sd = make_unet("sd")
    call = make_call(sd)
    call.update(controlnet_residuals(sd, call))
    names = CallFlattener(sd).input_names((), call)
    assert names[3] == "down_block_additional_residuals.0" and names[-1] == "mid_block_additional_residual"
    assert len(names) == 3 + 12 + 1


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
    flatten = CallFlattener(unet)
    call = {**make_call(unet), "timestep": 500}
    traced = trace_unet(unet, flatten((), call), flatten.input_names((), call))
    ehs = call["encoder_hidden_states"]
    with torch.no_grad():
        for t in (500, 20):
            (out,) = traced.gm(call["sample"], torch.tensor(t), ehs)
            assert torch.equal(out, unet(call["sample"], t, encoder_hidden_states=ehs).sample)


def test_bad_call_names_the_signature():
    unet = make_unet("ddpm")
    try:
        CallFlattener(unet)((torch.randn(1, 3, 16, 16),), {"timestep": 1, "encoder_hidden_states": 1})
    except TypeError as err:
        assert "forward signature is" in str(err)
    else:
        raise AssertionError("an unexpected keyword must be refused")
