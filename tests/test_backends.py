"""Backends against the eager reference, with tolerances stated per backend and dtype."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.runtime.backends import available_backends, get_backend, register_backend, registered_backend

from conftest import make_call, make_unet

# Per call (no loop amplification), fp32. Inductor, AOTInductor and ONNX Runtime fuse and reorder fp32
# arithmetic (Inductor also folds weights with freezing): rounding-level differences.
TOLERANCE = {(b, torch.float32): dict(rtol=1e-4, atol=1e-4) for b in ("inductor", "aoti", "onnxruntime")}


def test_registry():
    assert set(available_backends()) >= {"eager", "inductor"}
    with pytest.raises(ValueError, match="backend='tvm' is unknown"):
        get_backend("tvm")
    with pytest.raises(ValueError, match="backend='tvm' is unknown"):
        compile_deepcache(make_unet("ddpm-class"), branch=0, backend="tvm")


def test_bad_backend_options_are_refused():
    unet = make_unet("ddpm-class")
    dc = compile_deepcache(unet, branch=0, backend="inductor", backend_options={"modee": "max-autotune"})
    with pytest.raises(ValueError, match=r"options \['modee'\] are unknown; it accepts \['attention', 'dynamic', "
                                         r"'freezing', "):
        dc(**make_call(unet))
    with pytest.raises(ValueError, match="backend 'eager' is already registered"):
        register_backend("eager", lambda gm, inputs, options: gm)


@pytest.mark.parametrize("backend, arch", [("inductor", "sd-mini"), ("onnxruntime", "sd-mini"),
                                           ("aoti", "sd-mini")])
def test_compiled_calls_match_eager(backend, arch):
    import tempfile
    from pathlib import Path

    temp = Path(tempfile.gettempdir())
    before = {p.name for p in temp.iterdir()}
    unet = make_unet(arch)
    call = make_call(unet, batch=2)
    extra = {k: v for k, v in call.items() if k not in ("sample", "timestep")}
    compiled = compile_deepcache(unet, branch=1, interval=2, backend=backend)
    eager = compile_deepcache(unet, branch=1, interval=2)
    for t in (900, 800, 700, 600, 500):  # full, shallow, full, shallow, full
        a = compiled(call["sample"], t, **extra).sample
        b = eager(call["sample"], t, **extra).sample
        torch.testing.assert_close(a, b, **TOLERANCE[(backend, torch.float32)])
    assert compiled.history == "FSFSF"
    # ONNX files and AOTInductor packages are gone once loaded: nothing of ours is left in the temp folder.
    assert [p.name for p in temp.iterdir() if p.name not in before and p.name.startswith("deepcache_")] == []


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    from deepcache_compile.artifacts.formats.onnx import OrtRunner

    with pytest.raises(ImportError, match=r"pip install 'deepcache_compile\[onnx\]'"):
        OrtRunner("unused.onnx", torch.device("cpu"))


def _shallow_off_by_one_percent(gm, example_inputs, options):
    """A deliberately wrong backend: the shallow graph's output is scaled by 1.01 (the full graph is right)."""
    if type(gm).__name__ != "DeepCacheShallow":
        return gm
    return lambda *tensors: tuple(t * 1.01 for t in gm(*tensors))


def test_a_miscompiled_graph_is_caught_at_compile_time():
    with registered_backend("wrong-shallow", _shallow_off_by_one_percent):
        _check_the_miscompilation_is_caught()
    assert "wrong-shallow" not in available_backends()  # the scoped registration is gone


def _check_the_miscompilation_is_caught():
    unet = make_unet("ddpm-class")
    call = make_call(unet, batch=2)
    with pytest.raises(RuntimeError, match=r"wrong-shallow backend's shallow graph differs from the eager graph "
                                           r"by 0\.01 \(relative max\) for branch 1: a miscompilation"):
        compile_deepcache(unet, branch=1, backend="wrong-shallow").prepare(**call)
    # verify=False skips the check: the wrong graph then runs (what the check exists to prevent).
    dc = compile_deepcache(unet, branch=1, interval=2, backend="wrong-shallow", verify=False)
    eager = compile_deepcache(unet, branch=1, interval=2)
    for t in (900, 800):
        wrong, right = dc(**{**call, "timestep": t}).sample, eager(**{**call, "timestep": t}).sample
    torch.testing.assert_close(wrong, right * 1.01)


def test_onnxruntime_runner_binds_bf16_inputs_and_outputs(tmp_path):
    """numpy has no bf16: inputs and outputs go through IO binding with ONNX element types and DLPack."""
    from deepcache_compile.artifacts.formats.onnx import OrtRunner, write_onnx

    class Mixed(torch.nn.Module):  # ORT's CPU kernels lack bf16 arithmetic; Cast takes it in and out
        def forward(self, x, y):
            return ((x.float() * y.float() + x.float()).bfloat16(), y.float().sum())

    x, y = torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    program = torch.export.export(Mixed(), (x, y), strict=False)
    runner = OrtRunner(write_onnx(program, tmp_path / "m.onnx", ["x", "y"], ["out", "total"])[0], torch.device("cpu"))
    out, total = runner(x, y)
    assert out.dtype == torch.bfloat16 and total.dtype == torch.float32
    assert torch.equal(out, Mixed()(x, y)[0])
    torch.testing.assert_close(total, y.float().sum())


class _GraphReplay:
    """Like a CUDA graph on CPU: every call writes its outputs into the same buffers and returns them."""

    def __init__(self, gm, declare: bool):
        self.gm, self.buffers = gm, None
        if declare:
            self.static_outputs = True

    def __call__(self, *inputs):
        outputs = self.gm(*inputs)
        if self.buffers is None:
            self.buffers = tuple(torch.empty_like(o) for o in outputs)
        for buffer, o in zip(self.buffers, outputs):
            buffer.copy_(o)
        return self.buffers


@pytest.mark.parametrize("declare", [True, False])
def test_outputs_a_graph_overwrites_are_never_kept(declare):
    """The cache of a full step must survive the shallow steps after it, and with separate CFG calls the first
    call's sample must survive the second call: with `static_outputs` declared the pair copies them (equal to the
    eager pair), without it the replayed buffers are visibly overwritten (this test can fail)."""
    with registered_backend(f"replayed-{declare}", lambda gm, inputs, options, **shapes: _GraphReplay(gm, declare)):
        _check_replayed_outputs(declare)


def _check_replayed_outputs(declare: bool) -> None:
    name = f"replayed-{declare}"
    unet = make_unet("ddpm-class")
    first, second = make_call(unet, batch=2, seed=1), make_call(unet, batch=2, seed=2)
    replayed = compile_deepcache(unet, branch=1, interval=3, backend=name, calls_per_step=2, verify=False)
    eager = compile_deepcache(unet, branch=1, interval=3, calls_per_step=2)
    matches = []
    for t in (900, 800, 700, 600):  # full, shallow, shallow, full: two calls per step
        a = [replayed(**{**c, "timestep": t}).sample for c in (first, second)]
        b = [eager(**{**c, "timestep": t}).sample for c in (first, second)]
        matches += [torch.equal(x, y) for x, y in zip(a, b)]
    assert all(matches) == declare
