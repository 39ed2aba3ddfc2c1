"""The compile cache (`artifacts.cache`): a second compile with the same key loads instead of compiling, with the
same outputs; a changed weight or option misses; a corrupt entry is compiled again; eviction; two processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.artifacts import cache as compile_cache
from deepcache_compile.artifacts.formats import aoti

from conftest import make_unet


@pytest.fixture(scope="module")
def micro():
    """A micro U-Net (what is cached does not depend on the model; compiling it is the tests' cost)."""
    sample = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return make_unet("micro"), sample, torch.tensor(500)


@pytest.fixture
def packages(monkeypatch):
    """The AOTInductor packages compiled, by part (a cache hit compiles none): the full graph is the one with two
    outputs (the sample and the cache)."""
    calls = []
    package = aoti.package

    def counted(*args, **kwargs):
        calls.append("full" if len(args[0].graph_signature.user_outputs) == 2 else "shallow")
        return package(*args, **kwargs)

    monkeypatch.setattr(aoti, "package", counted)
    return calls


def _run(dc, sample, t):
    with torch.no_grad():
        full = dc(sample, t).sample
        shallow = dc(sample, t - 10).sample
    return full, shallow


def test_aoti_cache_hit_miss_and_corruption(micro, packages, tmp_path):
    import copy

    unet, sample, t = micro
    first = _run(compile_deepcache(unet, branch=1, interval=2, backend="aoti", cache_dir=tmp_path), sample, t)
    assert len(packages) == 2  # full and shallow compiled into the cache
    assert len(compile_cache.CompileCache(tmp_path).entries()) == 2

    again = _run(compile_deepcache(unet, branch=1, interval=2, backend="aoti", cache_dir=tmp_path), sample, t)
    assert len(packages) == 2  # both loaded
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    # A changed weight is another key for the graph that reads it: the mid block runs in the full graph only, so
    # the full graph is compiled again and the shallow one (which holds no mid-block weight) is loaded.
    edited = copy.deepcopy(unet)
    with torch.no_grad():
        edited.mid_block.resnets[0].conv1.bias.add_(1e-3)
    compile_deepcache(edited, branch=1, backend="aoti", cache_dir=tmp_path).prepare(sample, t)
    assert packages[2:] == ["full"] and len(compile_cache.CompileCache(tmp_path).entries()) == 3

    # A corrupt entry is detected by its recorded SHA-256, removed and compiled again, never loaded.
    target = sorted(tmp_path.glob("??/*/graph.aoti.pt2"))[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    compile_deepcache(unet, branch=1, interval=2, backend="aoti", cache_dir=tmp_path).prepare(sample, t)
    compile_deepcache(edited, branch=1, backend="aoti", cache_dir=tmp_path).prepare(sample, t)
    assert len(packages) == 4  # the corrupt one compiled again, the two others loaded
    for f in tmp_path.glob("??/*/graph.aoti.pt2"):
        assert compile_cache.sha256(f) == json.loads((f.parent / "entry.json").read_text())["sha256"][f.name]


def test_the_key_covers_options_shapes_weights_and_versions(micro, monkeypatch):
    from deepcache_compile.calls import CallFlattener
    from deepcache_compile.graph.trace import trace_unet

    unet, sample, t = micro
    gm = trace_unet(unet, CallFlattener(unet)((sample, t), {})).gm
    inputs = (sample, t)
    base = compile_cache.graph_key("aoti", gm, inputs, {"a": 1})
    assert compile_cache.graph_key("aoti", gm, inputs, {"a": 1}) == base
    assert compile_cache.graph_key("aoti", gm, inputs, {"a": 2}) != base
    assert compile_cache.graph_key("onnxruntime", gm, inputs, {"a": 1}) != base
    assert compile_cache.graph_key("aoti", gm, (sample[:1], t), {"a": 1}) != base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert compile_cache.graph_key("aoti", gm, inputs, {"a": 1}) != base
    monkeypatch.undo()
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1  # in place: the version counter moves, the digest is taken again
    try:
        assert compile_cache.graph_key("aoti", gm, inputs, {"a": 1}) != base
    finally:
        with torch.no_grad():
            unet.conv_in.weight[0, 0, 0, 0] -= 1


def test_eviction_keeps_the_most_recently_used(tmp_path):
    cache = compile_cache.CompileCache(tmp_path, max_bytes=2500)
    for key in ("aa01", "bb02", "cc03"):
        cache.put(key, "f.bin", lambda p: p.write_bytes(b"x" * 1000))
        assert cache.get(key, "f.bin") is not None
    assert cache.get("aa01", "f.bin") is None  # the oldest went when the third arrived
    assert cache.get("bb02", "f.bin") is not None and cache.get("cc03", "f.bin") is not None


def test_the_environment_variable_sets_the_cache_for_backends_that_take_one(micro, monkeypatch, tmp_path):
    unet, _, _ = micro
    monkeypatch.setenv(compile_cache.CACHE_DIR_ENV, str(tmp_path))
    assert compile_deepcache(unet, branch=1, backend="aoti").deepcache_config.cache_dir == str(tmp_path)
    assert compile_deepcache(unet, branch=1, backend="inductor").deepcache_config.cache_dir is None
    with pytest.raises(ValueError, match="keeps no compiled files to cache"):
        compile_deepcache(unet, branch=1, backend="inductor", cache_dir=tmp_path)


_PROCESS = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    from conftest import make_unet
    from deepcache_compile import compile_deepcache
    from deepcache_compile.artifacts.formats import aoti
    compiled, package = [], aoti.package
    aoti.package = lambda *a, **k: compiled.append(1) or package(*a, **k)
    unet = make_unet("micro")
    sample = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    dc = compile_deepcache(unet, branch=1, interval=2, backend="aoti", cache_dir=sys.argv[1])
    with torch.no_grad():
        out = torch.cat([dc(sample, torch.tensor(500)).sample, dc(sample, torch.tensor(490)).sample])
    torch.save({"out": out, "compiled": len(compiled)}, sys.argv[2])
""")


def test_two_processes_writing_one_key_then_a_third_loading(tmp_path):
    """Two processes compile the same pair into one cache at once (the second rename loses and keeps the first's
    entry); a third process loads it, with outputs bitwise equal to the first two."""
    script = tmp_path / "run.py"
    script.write_text(_PROCESS)
    cache = tmp_path / "cache"
    tests = str(Path(__file__).parent)
    writers = [subprocess.Popen([sys.executable, str(script), str(cache), str(tmp_path / f"{i}.pt"), tests])
               for i in range(2)]
    assert all(p.wait(timeout=600) == 0 for p in writers)
    entries = compile_cache.CompileCache(cache).entries()
    assert len(entries) == 2 and not list(cache.glob(".writing-*"))
    subprocess.run([sys.executable, str(script), str(cache), str(tmp_path / "2.pt"), tests], check=True, timeout=600)
    runs = [torch.load(tmp_path / f"{i}.pt") for i in range(3)]
    assert runs[2]["compiled"] == 0 and runs[0]["compiled"] + runs[1]["compiled"] >= 2
    assert torch.equal(runs[0]["out"], runs[1]["out"]) and torch.equal(runs[0]["out"], runs[2]["out"])


def test_dynamic_pairs_share_the_weights_through_the_cache(micro, packages, tmp_path):
    """Dynamic aoti pairs hold no weights (share_weights): a cached package binds the U-Net's own tensors by name."""
    unet, _, _ = micro
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    ranges = dict(batch=(1, 4), height=(8, 32), width=(8, 32))
    outs = [_run(compile_deepcache(unet, branch=1, interval=2, backend="aoti", dynamic=ranges, cache_dir=tmp_path),
                 x, torch.tensor(500)) for _ in range(2)]
    assert len(packages) == 2
    assert all(torch.equal(a, b) for a, b in zip(*outs))
