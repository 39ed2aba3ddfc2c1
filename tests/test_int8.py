"""int8 graphs (`precision.Int8`): calibration on recorded calls, what is quantized, the quality cost on the trained
digits model, the compiled int8 kernels against the eager int8 graphs, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepcache_compile import Int8, compile_deepcache, record_calls
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.sampling import ddim_loop

pytest.importorskip("torchao", reason="int8 needs torchao (pip install 'deepcache-compile[int8]')")

from deepcache_compile.graph.quantize import quantized_ops  # noqa: E402

STEPS = 20


@pytest.fixture(scope="module")
def digits():
    unet, scheduler = load_digits_model()
    noise = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    other = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # calibration: other noise
    calls = record_calls(unet, lambda: ddim_loop(unet, {"sample": other}, STEPS, scheduler))
    full = ddim_loop(unet, {"sample": noise}, STEPS, scheduler)
    return unet, scheduler, noise, calls, full


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((images.clamp(-1, 1) - reference.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def test_record_calls_keeps_every_call_in_order(digits):
    unet, scheduler, noise, _, _ = digits
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        calls = record_calls(unet, lambda: ddim_loop(unet, {"sample": noise[:2]}, 4, scheduler))
    finally:
        handle.remove()
    assert len(calls) == 4
    assert torch.equal(calls[0][0][0], noise[:2])  # the first call gets the initial noise
    for (args, _), sample in zip(calls, seen):
        assert torch.equal(args[0], sample)
    with pytest.raises(ValueError, match="never called"):
        record_calls(unet, lambda: None)


@pytest.mark.parametrize("keep,keep_input", [((), False), ((), True), (("conv_out", "time_embedding"), True)])
def test_every_convolution_and_linear_is_quantized_but_the_kept_ones(digits, keep, keep_input):
    unet, _, noise, calls, _ = digits
    pair = compile_deepcache(unet, branch=1, interval=3, quantize=Int8(calls, keep=keep, keep_input=keep_input)
                             ).prepare(noise, torch.tensor(999))
    kept = (*keep, "conv_in") if keep_input else keep  # the layer the sample enters: the U-Net's conv_in
    layers = [name for name, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and not any(name == k or name.startswith(k + ".") for k in kept)]
    assert quantized_ops(pair.split.full) == len(layers)
    assert 0 < quantized_ops(pair.split.shallow) < len(layers)


def _cpu_has_vnni() -> bool:
    """From /proc/cpuinfo (`cpu_isa`), not from torch's check that `Int8` asks."""
    from deepcache_compile.artifacts.manifest import cpu_isa

    return "avx512_vnni" in cpu_isa()


def _activation_ranges(gm) -> set[tuple[int, int]]:
    """(quant_min, quant_max) of every per-tensor quantize node of an int8 graph."""
    return {(n.args[3], n.args[4]) for n in gm.graph.nodes
            if n.op == "call_function" and "quantize_per_tensor" in str(n.target)}


@pytest.mark.parametrize("reduce_range", [None, True, False])
def test_activations_take_seven_bits_where_the_cpu_has_no_vnni(digits, reduce_range):
    """Without VNNI oneDNN's uint8 x int8 products are summed in pairs into saturating int16: the activations are
    quantized to 0..127 there by default (and wherever asked), to 0..255 with VNNI or when told."""
    unet, _, noise, calls, _ = digits
    pair = compile_deepcache(unet, branch=1, interval=3, quantize=Int8(calls, reduce_range=reduce_range)
                             ).prepare(noise, torch.tensor(999))
    seven = (not _cpu_has_vnni()) if reduce_range is None else reduce_range
    expected = {(0, 127)} if seven else {(0, 255)}
    assert _activation_ranges(pair.split.full) == expected
    assert _activation_ranges(pair.split.shallow) == expected


def test_the_input_layer_is_found_from_the_graph():
    from conftest import make_transformer, make_transformer_call, trace

    from deepcache_compile.graph.quantize import input_layer

    dit = make_transformer("dit")
    assert input_layer(trace(dit, make_transformer_call("dit")).gm).endswith("pos_embed.proj")


def test_int8_deepcache_costs_little_more_than_fp32_deepcache(digits):
    """The quality target on the trained model: int8 DeepCache within 1 dB PSNR of fp32 DeepCache (both against
    the fp32 full model, paired by noise) with 8-bit activations; 7-bit ones (CPUs without VNNI) cost more; the
    int8 full model is not the fp32 one (something was quantized). Eager: the float reference of the int8 graphs,
    which still moves by CPU (fp32 convolutions round differently, and values near a quantization step fall on
    the other side): 8-bit 0.45 / 0.0 dB and 7-bit 1.2 / 1.9 dB below fp32 on the AMD EPYCs / an AMX Xeon
    (docs/quality.md). A wrong scale or zero point costs far more than these bounds."""
    unet, scheduler, noise, calls, full = digits

    def generate(interval: int, **int8) -> torch.Tensor:
        quantize = Int8(calls, **int8) if int8 else None
        return ddim_loop(compile_deepcache(unet, branch=1, interval=interval, quantize=quantize), {"sample": noise},
                         STEPS, scheduler)

    fp32 = _psnr(generate(3), full)
    assert _psnr(generate(3, reduce_range=False), full) >= fp32 - 1.0  # 8-bit activations (VNNI CPUs)
    assert _psnr(generate(3, reduce_range=True), full) >= fp32 - 2.5  # 7-bit: measured 1.2-1.9 dB below fp32
    assert 25 < _psnr(generate(1, reduce_range=False), full) < 80


def test_int8_refusals(digits):
    unet, _, noise, calls, _ = digits
    with pytest.raises(ValueError, match="record generations at this size"):
        compile_deepcache(unet, branch=1, quantize=Int8(calls)).prepare(noise[:3], torch.tensor(999))
    with pytest.raises(ValueError, match="runs on the backends"):
        compile_deepcache(unet, branch=1, backend="onnxruntime", quantize=Int8(calls))
    with pytest.raises(ValueError, match="static pairs"):
        compile_deepcache(unet, branch=1, dynamic=True, quantize=Int8(calls))
    with pytest.raises(ValueError, match="adaptive refresh"):
        compile_deepcache(unet, branch=1, refresh="adaptive", quantize=Int8(calls))
    with pytest.raises(ValueError, match="needs recorded model calls"):
        Int8(())
    with pytest.raises(ValueError, match="no layer of the traced graph is called 'conv_inn'"):
        compile_deepcache(unet, branch=1, quantize=Int8(calls, keep=("conv_inn",))).prepare(noise, torch.tensor(9))


def test_int8_kernels_match_the_eager_int8_graphs(digits, backend="inductor"):
    """Inductor lowers the quantize/dequantize pairs to oneDNN int8 kernels: the generation equals the eager int8
    one (the float reference of the same quantized graphs) up to requantization rounding. (AOTInductor: the
    export test below runs its packages.)"""
    unet, scheduler, noise, calls, full = digits
    eager = ddim_loop(compile_deepcache(unet, branch=1, interval=3, quantize=Int8(calls)), {"sample": noise}, STEPS,
                      scheduler)
    dc = compile_deepcache(unet, branch=1, interval=3, backend=backend, quantize=Int8(calls))
    compiled = ddim_loop(dc, {"sample": noise}, STEPS, scheduler)
    assert _psnr(compiled, eager) > 35
    assert _psnr(compiled, full) >= _psnr(eager, full) - 0.5


def test_int8_aoti_export_runs_in_both_runtimes(digits, tmp_path):
    """The int8 graphs export as AOTInductor packages with a dynamic batch (traced with symbolic sizes, calibrated
    on the recorded calls inside the ranges); the Python and the C++ runtime run them alike."""
    import json

    from deepcache_compile import load_deepcache
    from deepcache_compile.artifacts.native import library_path

    unet, scheduler, noise, calls, full = digits
    dc = compile_deepcache(unet, branch=1, interval=3, quantize=Int8(calls))
    eager = ddim_loop(dc, {"sample": noise}, STEPS, scheduler)
    path = dc.export(tmp_path, format="aoti", example={"sample": noise, "timestep": torch.tensor(999)},
                     batch=(1, 32), height=(16, 16), width=(16, 16))
    assert json.loads((path / "deepcache.json").read_text())["int8"] == {
        "keep": [], "keep_input": True, "seven_bit": not _cpu_has_vnni(), "calibration_calls": STEPS}
    engine = load_deepcache(path)
    exported = ddim_loop(engine, {"sample": noise}, STEPS, scheduler)
    assert _psnr(exported, eager) > 35
    assert _psnr(ddim_loop(engine, {"sample": noise[:4]}, STEPS, scheduler), eager[:4]) > 35  # another batch
    if not library_path().is_file():
        pytest.skip("the C++ runtime is not built (make native)")
    native = ddim_loop(load_deepcache(path, runtime="native"), {"sample": noise}, STEPS, scheduler)
    assert torch.equal(native, exported)


def test_a_transformer_quantized_by_torchao_compiles_with_inductor_and_caches():
    """Weights that torchao's `quantize_` made int8 (tensor-subclass weights, activations quantized at run time):
    the eager pair's full step equals the quantized model bitwise; Inductor's pair passes its verification within
    the int8 bound (its activation rounding falls on the other quantization step in places, 0.006 relative here,
    which the float bound of 1e-3 refused as a miscompilation) and caches on its schedule, within that bound of
    the eager pair over three steps."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from conftest import make_transformer, make_transformer_call

    model = make_transformer("flux")
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    calls = [{**make_transformer_call("flux", batch=2), "timestep": torch.full((2,), t / 1000)}
             for t in (900, 800, 700)]
    with torch.no_grad():
        expected = model(**calls[0]).sample
    outs = []
    for backend in ("eager", "inductor"):
        dc = compile_deepcache(model, branch=0, interval=2, backend=backend)
        with torch.no_grad():
            outs.append(torch.stack([dc(**call).sample for call in calls]))
        assert dc.history == "FSF"
    assert torch.equal(outs[0][0], expected)
    error = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
    assert error < 0.1  # the bound its verification applied (0.006 measured on an AMX Xeon)
