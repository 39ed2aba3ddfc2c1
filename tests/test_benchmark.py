"""The benchmark harness end to end on the tiny preset (the output files' structure and the derived columns, not
timings), its memory probes, backend specs and the `backend="auto"` choice."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.benchmark import BenchOptions, parse_backend, run_benchmark
from deepcache_compile.eval.cli import main
from deepcache_compile.eval.memory import peak_during, resident
from deepcache_compile.eval.presets import build_unet, example_call
from deepcache_compile.runtime import backends


def test_bench_writes_rows_table_and_plot_for_each_dtype(tmp_path, capsys):
    main(["bench", "--preset", "tiny-sd", "--resolution", "64", "--steps", "4", "--interval", "2", "3",
          "--backend", "eager", "--dtype", "fp32", "bf16", "--baseline", "unet-eager", "reference-helper",
          "--repeats", "2", "--min-run-time", "0.2", "--out", str(tmp_path)])
    stem = tmp_path / "tiny-sd_64px_b2_branch1"
    rows = json.loads(stem.with_suffix(".json").read_text())
    unet = build_unet("tiny-sd")
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # one U-Net call, counted independently
        unet(**example_call(unet, batch=2, height=8, width=8))
    step_gflop = counter.get_total_flops() / 1e9
    references = [r for r in rows if r["name"] == "unet-eager fp32"]  # each dtype's run timed its own
    assert len(references) == 2 and references[0]["median_s"] != references[1]["median_s"]
    for dtype in ("fp32", "bf16"):
        run = [r for r in rows if r["run_dtype"] == dtype]
        names = [r["name"] for r in run]
        assert names[0] == "unet-eager fp32"  # the common reference row of every dtype's run
        assert f"deepcache eager {dtype} uniform N=2" in names and f"deepcache eager {dtype} uniform N=3" in names
        assert ("unet-eager bf16" in names) == (dtype == "bf16")
        helpers = {r["interval"]: r["median_s"] for r in run if r["name"].startswith("reference-helper")}
        assert sorted(helpers) == [2, 3]
        for r in run:
            assert r["threads"] == torch.get_num_threads() and r["torch"] == torch.__version__
            assert r["speedup_vs_unet_eager_fp32"] == pytest.approx(run[0]["median_s"] / r["median_s"])
            assert r["roofline_s"] == pytest.approx(r["gflop"] / r["matmul_peak_gflops"])
            assert r["roofline_fraction"] == pytest.approx(r["roofline_s"] / r["median_s"])
            if r["name"].startswith("unet-eager"):
                assert r["gflop"] == pytest.approx(4 * step_gflop, rel=1e-6)
            if r["name"].startswith("deepcache"):
                assert r["dtype"] == dtype
                # 4 steps: N=2 runs 2 full + 2 shallow steps, N=3 2 + 2 as well (full at 0 and 3).
                assert r["full_steps"] == 2
                assert r["full_gmacs"] * 2 == pytest.approx(step_gflop, rel=1e-6)
                share = r["shallow_gmacs"] / r["full_gmacs"]
                assert r["mac_bound_speedup"] == pytest.approx(4 / (2 + 2 * share))
                assert r["gflop"] == pytest.approx(2 * (2 * r["full_gmacs"] + 2 * r["shallow_gmacs"]))
                expected = (2 * r["full_ms"] + 2 * r["shallow_ms"]) / 1e3 / r["median_s"]
                assert r["dispatch_efficiency"] == pytest.approx(expected)
                if r["schedule"] == "uniform":
                    assert r["speedup_vs_reference_helper"] == pytest.approx(helpers[r["interval"]] / r["median_s"])
                assert r["latent_error"] == 0  # the eager pair is its own reference: bitwise
            if r["name"].startswith("reference-helper"):  # the helper's DeepCache against ours, same schedule
                assert r["latent_error"] < (1e-5 if dtype == "fp32" else 5e-2)
    with open(stem.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert stem.with_suffix(".png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| configuration |" in out and "Fastest DeepCache backend" in out


def test_one_loop_times_every_dtype_side_by_side_against_one_reference(tmp_path, monkeypatch):
    """--one-loop: one interleaved loop over both dtypes' candidates (each round runs every one of them once), one
    fp32 reference row, and every row's ratio divides that reference's median."""
    from deepcache_compile.eval import benchmark

    loops, time_interleaved = [], benchmark._time_interleaved
    monkeypatch.setattr(benchmark, "_time_interleaved",
                        lambda candidates, opts, label: loops.append([c.name for c in candidates]) or
                        time_interleaved(candidates, opts, label))
    rows = run_benchmark(BenchOptions(preset="tiny-sd", resolution=64, steps=4, intervals=(2,),
                                      schedules=("uniform",), backends=("eager",), dtypes=("fp32", "bf16"),
                                      baselines=("unet-eager",), repeats=2, min_run_time=0.05, out=str(tmp_path),
                                      one_loop=True))
    assert loops == [["unet-eager fp32", "deepcache eager fp32 uniform N=2", "unet-eager bf16",
                      "deepcache eager bf16 uniform N=2"]]
    assert [r["name"] for r in rows] == loops[0]
    assert [r["run_dtype"] for r in rows] == ["fp32", "fp32", "bf16", "bf16"]
    for r in rows:
        assert r["speedup_vs_unet_eager_fp32"] == pytest.approx(rows[0]["median_s"] / r["median_s"])


def test_a_backend_that_fails_gives_a_row_with_its_error_and_the_others_still_run(tmp_path):
    def broken(gm, example_inputs, options, **shapes):
        raise RuntimeError("no kernel for this dtype")

    with backends.registered_backend("broken-for-bench", broken):
        rows = run_benchmark(BenchOptions(preset="tiny-sd", resolution=64, steps=2, intervals=(2,),
                                          schedules=("uniform",), backends=("broken-for-bench", "eager"),
                                          dtypes=("fp32",), baselines=(), repeats=1, min_run_time=0.05,
                                          out=str(tmp_path)))
    failed = [r for r in rows if r["backend"] == "broken-for-bench"]
    assert len(failed) == 1 and "no kernel for this dtype" in failed[0]["error"] and "median_s" not in failed[0]
    assert [r["name"] for r in rows if "median_s" in r] == ["unet-eager fp32", "deepcache eager fp32 uniform N=2"]
    assert "failed: RuntimeError: no kernel" in (tmp_path / "tiny-sd_64px_b2_branch1.md").read_text()


def test_memory_probes_see_what_is_held_and_what_is_transient():
    before = resident()
    held = torch.ones(50_000_000)  # 200 MB, touched
    assert resident() - before == pytest.approx(held.numel() * 4, rel=0.1)

    def transient():
        x = torch.ones(25_000_000)  # 100 MB, freed on return
        return float(x[0])

    start = resident()
    _, top = peak_during(transient)
    assert top - start == pytest.approx(100e6, rel=0.15)
    del held


def test_backend_specs_parse_options_and_refuse_what_is_not_a_literal():
    assert parse_backend("inductor") == ("inductor", {})
    assert parse_backend("inductor:freezing=False,mode='max-autotune'") == (
        "inductor", {"freezing": False, "mode": "max-autotune"})
    with pytest.raises(ValueError, match="name:key=value"):
        parse_backend("inductor:freezing")
    with pytest.raises(ValueError, match="not a Python literal"):
        parse_backend("inductor:mode=max-autotune")


def test_auto_backend_takes_the_measured_fastest_that_is_installed(monkeypatch):
    pytest.importorskip("onnxruntime")
    unet = build_unet("tiny-sd")
    assert compile_deepcache(unet, branch=1, backend="auto").deepcache_config.backend == "onnxruntime"
    assert compile_deepcache(unet.to(torch.bfloat16), branch=1, backend="auto").deepcache_config.backend == "inductor"
    assert "tensorrt" not in backends.runnable_backends("cpu") and "onnxruntime" in backends.runnable_backends("cpu")
    monkeypatch.setitem(backends._NEEDS, "onnxruntime", "a_module_that_is_not_installed")
    assert backends.choose_backend("cpu", torch.float32) == "inductor"
    assert "onnxruntime" not in backends.runnable_backends("cpu")
    with pytest.raises(ValueError, match="takes no backend_options"):
        compile_deepcache(unet, branch=1, backend="auto", backend_options={"freezing": False})
