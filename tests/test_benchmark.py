"""The benchmark harness end to end on the tiny preset: the output files' structure, not timings."""

from __future__ import annotations

import csv
import json

import pytest

from deepcache_compile.eval.cli import main


def test_bench_writes_rows_table_and_plot(tmp_path, capsys):
    main(["bench", "--preset", "tiny-sd", "--resolution", "64", "--steps", "4", "--interval", "2", "3",
          "--backend", "eager", "--baseline", "unet-eager", "reference-helper", "--repeats", "2", "--min-run-time", "0.2",
          "--out", str(tmp_path)])
    stem = tmp_path / "tiny-sd_64px_b2_branch1"
    rows = json.loads(stem.with_suffix(".json").read_text())
    names = [r["name"] for r in rows]
    assert names[0] == "unet-eager"
    assert "deepcache eager uniform N=2" in names and "deepcache eager nonuniform N=2" in names
    import torch

    for r in rows:
        assert r["threads"] == torch.get_num_threads() and r["torch"] == torch.__version__
        assert r["speedup_vs_unet_eager"] == pytest.approx(rows[0]["median_s"] / r["median_s"])
        if r["name"].startswith("deepcache"):
            # 4 steps: N=2 runs 2 full + 2 shallow steps, N=3 2 + 2 as well (full at 0 and 3).
            assert r["full_steps"] == 2
            share = r["shallow_gmacs"] / r["full_gmacs"]
            assert r["mac_bound_speedup"] == pytest.approx(4 / (2 + 2 * share))
            expected = (2 * r["full_ms"] + 2 * r["shallow_ms"]) / 1e3 / r["median_s"]
            assert r["dispatch_efficiency"] == pytest.approx(expected)
    with open(stem.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "| configuration |" in capsys.readouterr().out
