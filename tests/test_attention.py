"""The native bf16 attention kernel (kernels/attention.cpp) and the graph pass that substitutes it for SDPA."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from conftest import TINY_CONFIGS, make_call, make_unet
from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.artifacts.manifest import read_manifest
from deepcache_compile.calls import CallFlattener
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.graph.attention import attention_calls, substitute_attention
from deepcache_compile.graph.trace import trace_unet
from deepcache_compile.kernels import native_attention_missing

ROOT = Path(__file__).parents[1]
MISSING = native_attention_missing()
needs_kernel = pytest.mark.skipif(MISSING is not None, reason=f"native bf16 attention cannot run: {MISSING}")


def reference_attention(q, k, v, scale):
    """softmax(q k^T scale) v in float64 from the bf16 inputs: independent of both kernels."""
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def bf16_inputs(batch, heads, tokens, keys, dim, seed=0):
    """(batch, heads, tokens, dim) bf16 views over (batch, tokens, heads, dim) storage, as diffusers makes them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads, dim, generator=gen).bfloat16().transpose(1, 2)
    k = torch.randn(batch, keys, heads, dim, generator=gen).bfloat16().transpose(1, 2)
    v = (torch.randn(batch, heads, keys, dim, generator=gen) * 3).bfloat16()  # contiguous: another layout
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 8, 64, 64, 40), (2, 4, 37, 53, 13), (1, 3, 100, 77, 80), (2, 2, 9, 1, 7),
                                   (1, 2, 20, 33, 160)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_attention(shape):
    """Every head dim class (one, two and several 16-wide output chunks, odd dims), token and key counts off the
    kernel's blocks (8 rows, 32 keys), a single key: within bf16 rounding of the float64 result, and no worse
    than PyTorch's bf16 SDPA on the same inputs."""
    q, k, v = bf16_inputs(*shape)
    scale = shape[-1] ** -0.5
    expected = reference_attention(q, k, v, scale)
    ours = torch.ops.deepcache.attention_bf16(q, k, v, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == expected.shape and ours.dtype == torch.bfloat16
    error = (ours.double() - expected).abs().max().item()
    assert error <= 2 * (sdpa.double() - expected).abs().max().item() + 1e-3
    assert error <= 2 ** -7 * expected.abs().max().item()


@needs_kernel
def test_kernel_takes_the_scale_and_any_head_strides():
    """A non-default scale, and a key tensor whose head dim is not contiguous (copied by the kernel)."""
    q, k, v = bf16_inputs(1, 2, 24, 40, 16, seed=1)
    k_strided = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert k_strided.stride(-1) != 1
    out = torch.ops.deepcache.attention_bf16(q, k_strided, v, 0.05)
    assert (out.double() - reference_attention(q, k, v, 0.05)).abs().max().item() < 2e-2


@needs_kernel
def test_kernel_shape_function_agrees_with_the_kernel():
    """torch.library.opcheck: schema, the registered fake (shapes and strides under tracing) against the real
    kernel's output."""
    q, k, v = bf16_inputs(2, 4, 16, 24, 8)
    torch.library.opcheck(torch.ops.deepcache.attention_bf16.default, (q, k, v, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


@needs_kernel
def test_kernel_refuses_what_it_does_not_compute():
    q, k, v = bf16_inputs(1, 2, 8, 8, 8)
    with pytest.raises(RuntimeError, match="takes bf16 query, key and value"):
        torch.ops.deepcache.attention_bf16(q.float(), k, v, 1.0)
    with pytest.raises(RuntimeError, match="must share batch, heads and head dim"):
        torch.ops.deepcache.attention_bf16(q, k[..., :4], v, 1.0)
    with pytest.raises(RuntimeError, match="at least one key"):
        torch.ops.deepcache.attention_bf16(q, k[:, :, :0], v[:, :, :0], 1.0)


def _traced(dtype):
    unet = make_unet("sd-mini", dtype)
    call = make_call(unet, batch=2)
    return trace_unet(unet, CallFlattener(unet)((), call))


def _sdpa_calls(gm):
    return sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)


@needs_kernel
def test_pass_replaces_bf16_attention_in_a_copy():
    """Every SDPA call of a bf16 U-Net's graph is replaced (self- and cross-attention), the original graph keeps
    its SDPA calls and both compute the same outputs within bf16 attention rounding."""
    traced = _traced(torch.bfloat16)
    before = _sdpa_calls(traced.gm)
    substituted, replaced = substitute_attention(traced.gm)
    assert before == 12 and replaced == before  # sd-mini: 6 transformer blocks (2 down, mid, 3 up), 2 attentions each
    assert _sdpa_calls(traced.gm) == before and _sdpa_calls(substituted) == 0
    kernel_calls = [n for n in substituted.graph.nodes if n.target is torch.ops.deepcache.attention_bf16.default]
    assert len(kernel_calls) == replaced and dict(substituted.named_parameters()).keys() == dict(
        traced.gm.named_parameters()).keys()
    with torch.no_grad():
        expected = traced.gm(*traced.example_inputs)[0].float()
        actual = substituted(*traced.example_inputs)[0].float()
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 5e-2


def test_pass_counts_only_what_the_kernel_computes():
    """All 12 attention calls of a bf16 graph, none of an fp32 one, nor masked or causal calls (no library
    needed: the count decides whether the kernel is wanted at all)."""
    assert attention_calls(_traced(torch.bfloat16).gm) == 12 and attention_calls(_traced(torch.float32).gm) == 0

    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    + F.scaled_dot_product_attention(q, k, v, is_causal=True))

    q, k, v = bf16_inputs(1, 2, 8, 8, 8)
    gm = torch.export.export(Masked(), (q, k, v, torch.ones(8, 8, dtype=torch.bool))).module()
    assert _sdpa_calls(gm) == 2 and attention_calls(gm) == 0
    if MISSING is None:
        assert substitute_attention(gm)[1] == 0


@needs_kernel
def test_pass_keeps_the_scale_of_keyword_calls():
    """SDPA called with keywords and its own scale: replaced, and the scale reaches the kernel."""

    class Scaled(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3)

    q, k, v = bf16_inputs(1, 2, 16, 24, 8, seed=2)
    gm = torch.export.export(Scaled(), (q, k, v)).module()
    substituted, replaced = substitute_attention(gm)
    assert replaced == 1
    error = (substituted(q, k, v).double() - reference_attention(q, k, v, 0.3)).abs().max().item()
    assert error < 2e-2 < (reference_attention(q, k, v, 8 ** -0.5) - reference_attention(q, k, v, 0.3)).abs().max()


@needs_kernel
def test_inductor_runs_bf16_attention_on_the_kernel(caplog):
    """compile_deepcache with Inductor in bf16: attention on the kernel (logged; asked for, since "auto" keeps SDPA
    on CPUs with AMX), a full and a shallow step's outputs within bf16 rounding of the eager DeepCache steps'
    (which run SDPA)."""
    torch.manual_seed(0)  # sd-mini with one layer per block: 4 transformer blocks, a faster compile
    unet = UNet2DConditionModel(**{**TINY_CONFIGS["sd-mini"][1], "layers_per_block": 1}).to(torch.bfloat16).eval()
    call = make_call(unet, batch=2)
    eager = compile_deepcache(unet, branch=1, interval=2)
    with caplog.at_level("INFO", logger="deepcache_compile.graph.attention"):
        native = compile_deepcache(unet, branch=1, interval=2, backend="inductor",
                                   backend_options={"attention": "native"})
        native(**call)
    counts = [int(c) for c in re.findall(r"(\d+) attention calls on the native bf16 kernel", caplog.text)]
    assert counts[0] == 8 and len(counts) == 2 and 0 < counts[1] < 8  # the full graph's, the shallow one's
    native.reset(), eager.reset()
    for t in (900, 800):  # a full step, then a shallow one on its cache
        step = {**call, "timestep": torch.tensor(t)}
        with torch.no_grad():
            expected, actual = eager(**step).sample.float(), native(**step).sample.float()
        assert ((actual - expected).abs().max() / expected.abs().max()).item() < 3e-2, t


@needs_kernel
def test_aoti_export_calls_the_kernel_from_python_and_cpp(tmp_path):
    """`dc.export(format="aoti", options={"attention": "native"})` of a bf16 U-Net puts its attention on the kernel
    and records it in the manifest; the Python engine runs the packages within bf16 rounding of eager DeepCache (SDPA), and the C++
    program (no Python in the process: the runtime links the kernels) generates the same latents as the Python
    engine's loop over the same packages."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_CONFIGS["sd-mini"][1], "layers_per_block": 1}).to(torch.bfloat16).eval()
    call = make_call(unet, batch=2)
    dc = compile_deepcache(unet, branch=1, interval=2)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    dc.export(tmp_path, format="aoti", example=call, batch=(1, 4), scheduler=scheduler,
              options={"attention": "native"})
    assert read_manifest(tmp_path)["native_ops"] == ["deepcache::attention_bf16"]
    engine = load_deepcache(tmp_path)
    for t in (900, 800):  # a full step, then a shallow one on its cache
        step = {**call, "timestep": torch.tensor(t)}
        with torch.no_grad():
            expected, actual = dc(**step).sample.float(), engine(**step).sample.float()
        assert ((actual - expected).abs().max() / expected.abs().max()).item() < 3e-2, t
    program = ROOT / "build" / "deepcache-generate"
    if not program.is_file():
        pytest.skip("the C++ runtime is not built (make native)")
    inputs = {name: call[name].contiguous() for name in ("sample", "encoder_hidden_states")}
    save_file(inputs, tmp_path / "in.safetensors")
    result = subprocess.run([str(program), str(tmp_path), str(tmp_path / "in.safetensors"),
                             str(tmp_path / "out.safetensors"), "--steps", "4"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    native = load_file(tmp_path / "out.safetensors")["sample"]
    python = ddim_loop(load_deepcache(tmp_path), inputs, 4, scheduler)
    torch.testing.assert_close(native, python)


def test_attention_is_an_option_of_aoti_exports_only(tmp_path):
    unet = make_unet("sd-mini")
    with pytest.raises(ValueError, match=r"the onnx format: options \['attention'\] are unknown"):
        compile_deepcache(unet, branch=1).export(tmp_path, format="onnx", example=make_call(unet),
                                                 options={"attention": "native"})


@pytest.mark.parametrize("backend", ["inductor", "aoti"])
def test_attention_option_is_checked(backend):
    unet = make_unet("sd-mini")
    call = make_call(unet, batch=2)
    with pytest.raises(ValueError, match=f"the {backend} backend: attention='flash' is unknown"):
        compile_deepcache(unet, branch=1, backend=backend, backend_options={"attention": "flash"})(**call)
    with pytest.raises(RuntimeError, match="found no attention it computes"):  # fp32
        compile_deepcache(unet, branch=1, backend=backend, backend_options={"attention": "native"})(**call)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_keeps_sdpa_where_the_cpu_has_amx(amx, monkeypatch, caplog):
    """"auto" on a bf16 graph: SDPA where the CPU has AMX (simulated either way), the kernel elsewhere where it can
    run; "native" takes the kernel on either."""
    from deepcache_compile.graph import attention

    monkeypatch.setattr(attention, "amx_prefers_sdpa", lambda: amx)
    gm = _traced(torch.bfloat16).gm
    with caplog.at_level("INFO", logger="deepcache_compile.graph.attention"):
        auto = attention.with_native_attention(gm, "auto", "the test")
    if amx:
        assert auto is gm and "12 bf16 attention calls stay SDPA: this CPU has AMX" in caplog.text
    elif MISSING is None:
        assert _sdpa_calls(auto) == 0
    if MISSING is None:
        assert _sdpa_calls(attention.with_native_attention(gm, "native", "the test")) == 0


def test_inductor_says_why_the_kernel_cannot_run(monkeypatch):
    """Where the kernel cannot run (simulated: the reason a CPU without AVX512-BF16 gives), "native" on a bf16
    graph is an error that says why."""
    from deepcache_compile.graph import attention

    monkeypatch.setattr(attention, "native_attention_missing", lambda: "this CPU has no AVX512-BF16 instructions")
    unet = make_unet("sd-mini", torch.bfloat16)
    with pytest.raises(RuntimeError, match="attention='native' cannot run: this CPU has no AVX512-BF16"):
        compile_deepcache(unet, branch=1, backend="inductor", backend_options={"attention": "native"})(
            **make_call(unet, batch=2))
