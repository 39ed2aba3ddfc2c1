"""Weights that change after compiling: load_state_dict, in-place edits, .to(dtype) and a real LoRA fused by
diffusers/peft. Checked once per generation; baked-in weights are compiled again (or refused), eager follows."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from deepcache_compile import compile_deepcache

from conftest import make_call, make_unet


def _first_step(dc, call):
    """The first (full) step of a new generation: equal to the U-Net itself."""
    dc.reset()
    return dc(**call).sample


def test_baked_in_weights_are_compiled_again_after_load_state_dict(caplog):
    unet = make_unet("ddpm-class")
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=1, interval=2, backend="onnxruntime")  # the session holds the weights
    torch.testing.assert_close(_first_step(dc, call), unet(**call).sample, rtol=1e-4, atol=1e-4)
    state = {k: v * 1.5 if k.startswith("conv_out") else v for k, v in unet.state_dict().items()}
    unet.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="deepcache_compile.runtime.dispatch"):
        after = _first_step(dc, call)
    assert "weights changed since its pairs were compiled" in caplog.text
    with torch.no_grad():
        expected = unet(**call).sample
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)  # the new weights, not the baked-in ones


def test_error_policy_names_the_fix():
    unet = make_unet("ddpm-class")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1, on_weight_change="error")
    dc(**call)
    unet.to(torch.float64)  # a dtype change is a change of structure: even eager graphs must be traced again
    with pytest.raises(RuntimeError, match=r"weights changed since its eager pairs were compiled .*dc\.recompile\(\)"):
        _first_step(dc, make_call(unet))
    dc.recompile()
    call64 = make_call(unet)
    assert _first_step(dc, call64).dtype == torch.float64
    with pytest.raises(ValueError, match="on_weight_change='sometimes' is unknown"):
        compile_deepcache(unet, branch=1, on_weight_change="sometimes")


def test_eager_follows_in_place_edits_without_recompiling():
    unet = make_unet("ddpm-class")
    call = make_call(unet)
    dc = compile_deepcache(unet, branch=1)
    _first_step(dc, call)
    pair = dc.pairs[0]
    with torch.no_grad():
        unet.conv_out.weight.mul_(2)
    with torch.no_grad():
        assert torch.equal(_first_step(dc, call), unet(**call).sample)
    assert dc.pairs[0] is pair  # followed through the shared parameters, nothing compiled


# Inductor freezes the weights into its CPU graphs: without the check it keeps the pre-LoRA output. Eager graphs
# share the parameters that fuse_lora edits, so they would follow even without it (the check retraces them for
# the adapter's new parameters).
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_lora_fused_after_compiling_reaches_the_images(backend):
    pytest.importorskip("peft", reason="LoRA adapters in diffusers need peft")
    from peft import LoraConfig

    unet = make_unet("sd-mini")
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=1, interval=2, backend=backend)
    before = _first_step(dc, call)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        expected = unet(**call).sample
    assert not torch.allclose(expected, before, atol=1e-3)  # the LoRA changes the output
    tolerance = dict(rtol=0, atol=0) if backend == "eager" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_first_step(dc, call), expected, **tolerance)
    # The shallow step runs the fused weights too: it equals the eager shallow graph of the new trace.
    t = call["timestep"] - 1
    shallow = dc(**{**call, "timestep": t}).sample
    assert dc.history == "FS"
    reference = compile_deepcache(unet, branch=1, interval=2)
    reference(**call)
    torch.testing.assert_close(shallow, reference(**{**call, "timestep": t}).sample, **tolerance)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_release_weights_keeps_one_copy_and_refuses_what_needs_the_other(backend):
    pytest.importorskip("onnxruntime") if backend == "onnxruntime" else None
    unet = make_unet("ddpm-class")
    call, other = make_call(unet, batch=2), make_call(unet, batch=1)
    expected_bytes = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    eager = compile_deepcache(unet, branch=1, interval=2)
    expected = [eager(**{**call, "timestep": t}).sample for t in (900, 800, 700)]
    dc = compile_deepcache(unet, branch=1, interval=2, backend=backend)  # aoti on CPU: frozen, its own copy
    with pytest.raises(ValueError, match="nothing is compiled yet"):
        dc.release_weights()
    dc.prepare(**call)
    weights = {t.untyped_storage().data_ptr() for t in (*unet.parameters(), *unet.buffers())}
    assert dc.release_weights() >= expected_bytes  # the U-Net's storages (and any the trace made of its own)
    assert all(p.numel() == 0 for p in unet.parameters())
    # Nothing, reachable or left in a reference cycle, still views a released storage (the ONNX exporter leaves
    # transposed linear weights in cycles: freed only by a collection).
    assert not [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter) and o.numel()
                and _storage(o) in weights]
    got = [dc(**{**call, "timestep": t}).sample for t in (900, 800, 700)]  # a new generation: weight check skipped
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="weights were released"):
        dc(**{**other, "timestep": 900})
    with pytest.raises(RuntimeError, match="cannot recompile"):
        dc.recompile()


def test_aoti_graphs_share_the_unets_own_weights_when_told_and_copy_them_by_default_on_cpu():
    unet = make_unet("ddpm-class")
    call = make_call(unet, batch=2)
    frozen_before = _frozen_graph_modules()  # other tests' torch.compile graphs may hold some legitimately
    refused = compile_deepcache(unet, branch=1, interval=2, backend="aoti",
                                backend_options={"share_weights": True, "inductor_configs": {"freezing": True}})
    with pytest.raises(ValueError, match="cannot share the U-Net's weights with frozen graphs"):
        refused.prepare(**call)
    shared = compile_deepcache(unet, branch=1, interval=2, backend="aoti", backend_options={"share_weights": True})
    copied = compile_deepcache(unet, branch=1, interval=2, backend="aoti")  # CPU default: frozen, its own copy
    before = [_first_step(dc, call) for dc in (shared, copied)]
    # Freezing's traced graph (holding the U-Net's tensors and the constants folded from them) is not kept alive
    # by torch's record of the last trace.
    assert not _frozen_graph_modules() - frozen_before
    with pytest.raises(ValueError, match="share_weights': True"):
        shared.release_weights()
    # An edit through .data bumps no version counter: no check sees it, only a graph that reads the U-Net's own
    # memory does. (Not a bias: Inductor writes one-dimensional tensors of up to 8 elements into the code.)
    unet.conv_out.weight.data.mul_(2)
    with torch.no_grad():
        edited = unet(**call).sample
    assert not torch.allclose(edited, before[0], atol=1e-3)
    torch.testing.assert_close(_first_step(shared, call), edited, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_first_step(copied, call), before[1], rtol=0, atol=0)


def _frozen_graph_modules() -> set[int]:
    return {id(m) for m in gc.get_objects() if isinstance(m, torch.fx.GraphModule)
            and any(name.startswith("_frozen_param") for name in m._buffers)}


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # fake and functional tensors have no storage
        return None


def test_release_weights_is_refused_where_the_graphs_read_the_module():
    unet = make_unet("ddpm-class")
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=1)
    dc.prepare(**call)
    with pytest.raises(ValueError, match="eager graphs read the U-Net's weights at run time"):
        dc.release_weights()
    assert all(p.numel() > 0 for p in unet.parameters())
