"""Quality metrics: the formulas against known values, and the evaluation grid on a reduced setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepcache_compile.eval.quality import QualityOptions, evaluate_quality, frechet_distance, psnr, quality_table, write_results


def test_frechet_distance_of_a_shift_is_the_squared_shift():
    x = np.random.default_rng(0).normal(size=(2000, 16))
    shift = np.arange(16) / 10
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(x, x + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)


def test_frechet_distance_of_scaled_gaussians():
    x = np.random.default_rng(1).normal(size=(20000, 4))
    # covariances C and 4C, means m and 2m: |m|^2 + tr C + 4 tr C - 2 tr(2C) = |m|^2 + tr C (about 4)
    expected = (x.mean(0) ** 2).sum() + np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-6) and 3.9 < expected < 4.1


def test_psnr_in_unit_range():
    a = torch.zeros(2, 1, 4, 4)
    mse, db = psnr(a + 0.2, a)  # 0.2 in [-1, 1] units is 0.1 in [0, 1] units
    assert mse == pytest.approx(0.01) and db == pytest.approx(20)
    assert psnr(a, a)[1] == math.inf


def test_reduced_evaluation_runs_and_is_sane(tmp_path):
    opts = QualityOptions(steps=(10,), intervals=(2, 5), branches=(0,), schedules=("uniform",), samples=64,
                          out=str(tmp_path))
    rows = evaluate_quality(opts)
    by_kind = {r["kind"]: r for r in rows}
    real, noise = (r["fd"] for r in rows if r["kind"] == "reference")
    full = by_kind["full"]
    # The trained model is as close to the digits as 64 real digits are (both FDs carry the small-sample bias),
    # and far closer than noise.
    assert full["fd"] < 2 * real and full["fd"] < noise / 20
    assert 0.5 < full["confidence"] <= 1
    cached = [r for r in rows if r["kind"] == "deepcache"]
    assert [r["interval"] for r in cached] == [2, 5]
    for r in cached:
        assert 1 < r["mac_speedup"] < 10 and r["matched_steps"] < 10
        assert 10 < r["psnr"] < math.inf and math.isfinite(r["fd"])
        assert r["agreement"] * 64 == pytest.approx(round(r["agreement"] * 64))  # a share of the 64 samples
    assert cached[0]["psnr"] > cached[1]["psnr"]  # caching longer drifts further from the full model
    out = write_results(rows, opts)
    assert (out / "quality.png").stat().st_size > 1000
    assert quality_table(rows).count("\n") == 2 + len(rows)


def test_reduced_refresh_study_spends_the_budgets(tmp_path):
    from deepcache_compile import list_branches
    from deepcache_compile.eval.digits import load_digits_model
    from deepcache_compile.eval.refresh_study import RefreshStudyOptions, evaluate_refresh, write_refresh_results

    opts = RefreshStudyOptions(steps=(10,), intervals=(2, 5), samples=32, calibration_samples=16, out=str(tmp_path))
    rows = evaluate_refresh(opts)
    unet, _ = load_digits_model()
    share = list_branches(unet, torch.zeros(1, 1, 16, 16), 0)[1].mac_share
    cached = [r for r in rows if r["policy"] != "full model"]
    # No non-uniform schedule exists for T=10 (its center step is 15): that row is left out, not faked.
    assert {(r["policy"], r["forecast"]) for r in cached} == {(p, f) for p in ("uniform", "calibrated", "adaptive")
                                                               for f in (False, True)}
    for r in cached:
        if r["policy"] != "adaptive":  # static plans spend exactly the uniform schedule's full steps
            assert r["full_steps"] == r["budget"] == len(range(0, 10, r["interval"]))
        assert r["mac_fraction"] == pytest.approx((r["full_steps"] + (10 - r["full_steps"]) * share) / 10)
        assert 5 < r["psnr"] < math.inf
    out = write_refresh_results(rows, opts)
    assert (out / "refresh.png").stat().st_size > 1000 and (out / "refresh.md").read_text().count("\n") == 2 + len(rows)


def test_bf16_evaluation_scores_the_reduced_precision_against_fp32(tmp_path):
    """The bf16 full-model row's PSNR equals one computed here from a loop of our own (a bf16 copy of the model
    against the fp32 model, same noise), and the bf16 DeepCache rows are scored against fp32 too."""
    from diffusers import DDIMScheduler

    from deepcache_compile.eval.digits import load_digits_model

    opts = QualityOptions(steps=(6,), intervals=(2,), branches=(0,), schedules=("uniform",), samples=16,
                          dtype="bf16", out=str(tmp_path))
    rows = evaluate_quality(opts)
    low = next(r for r in rows if r["kind"] == "full-lowp")
    cached = next(r for r in rows if r["kind"] == "deepcache")
    assert low["name"] == "DDIM 6 bf16" and cached["dtype"] == "bf16" and "bf16" in cached["name"]

    unet, scheduler = load_digits_model()
    noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = unet.to(dtype)
        sched = DDIMScheduler.from_config(scheduler.config)
        sched.set_timesteps(6)
        x = noise.to(dtype)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(model(x, t).sample, t, x).prev_sample
        images[dtype] = x.float().clamp(-1, 1)
    mse = ((images[torch.bfloat16] - images[torch.float32]) / 2).pow(2).mean().item()
    assert low["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert math.isfinite(cached["psnr"]) and cached["psnr"] < low["psnr"]  # caching adds to the precision's error
    write_results(rows, opts)
    assert "| 6 | full model bf16 |" in (tmp_path / "quality.md").read_text()


def test_deepcache_rows_run_on_the_chosen_backend(tmp_path):
    """`backend` (with options, as bench takes them) compiles the DeepCache rows: a registered backend that runs
    the graphs as they are gets the options, and its rows score what the eager rows score."""
    from deepcache_compile.runtime.backends import registered_backend

    seen = []
    common = dict(steps=(4,), intervals=(2,), branches=(0,), schedules=("uniform",), samples=8)
    eager = evaluate_quality(QualityOptions(**common, out=str(tmp_path / "eager")))
    with registered_backend("quality-probe", lambda gm, inputs, options: seen.append(dict(options)) or gm):
        probed = evaluate_quality(QualityOptions(**common, backend="quality-probe:tag='x'", out=str(tmp_path / "p")))
    ours, reference = (next(r for r in rows if r["kind"] == "deepcache") for rows in (probed, eager))
    assert seen and all(options == {"tag": "x"} for options in seen)
    assert ours["backend"] == "quality-probe:tag='x'" and "quality-probe" in ours["name"]
    assert ours["psnr"] == reference["psnr"] and ours["fd"] == reference["fd"]


def test_transformer_study_charges_each_method_what_it_ran(tmp_path):
    """The digits DiT study on a reduced setting: FLOPs counted over whole generations equal the cut's MAC share
    (derived from FlopCounterMode per block by `list_branches`), our first-block rule and diffusers' hook spend the
    same full steps and give the same images, and the records are written."""
    from deepcache_compile import list_branches
    from deepcache_compile.eval.digits import digit_labels, load_digits_dit
    from deepcache_compile.eval.transformer_study import (TransformerStudyOptions, evaluate_transformer_caches,
                                                          write_transformer_results)

    opts = TransformerStudyOptions(steps=6, intervals=(3,), samples=8, calibration_samples=8, fd_seeds=(0,),
                                   methods=("uniform", "first-block", "diffusers FirstBlockCache",
                                            "diffusers TaylorSeer blocks o1"), out=str(tmp_path))
    rows = evaluate_transformer_caches(opts)
    by = {r["method"]: r for r in rows}
    model, _ = load_digits_dit()
    share = list_branches(model, torch.zeros(8, 1, 16, 16), torch.full((8,), 999),
                          class_labels=digit_labels(8))[0].mac_share
    uniform = by["uniform"]
    assert uniform["full_steps"] == 2
    assert uniform["flop_fraction"] == pytest.approx((2 + 4 * share) / 6, rel=1e-3)
    ours, theirs = by["first-block"], by["diffusers FirstBlockCache"]
    assert ours["full_steps"] == theirs["full_steps"] and ours["threshold"] == theirs["threshold"]
    assert ours["flop_fraction"] == pytest.approx(theirs["flop_fraction"], rel=1e-6)
    assert abs(ours["psnr"] - theirs["psnr"]) < 0.1 or min(ours["psnr"], theirs["psnr"]) > 60
    assert 0 < by["diffusers TaylorSeer blocks o1"]["flop_fraction"] < 1
    out = write_transformer_results(rows, opts)
    assert (out / "transformer.md").read_text().count("\n") == len(rows) + 2
