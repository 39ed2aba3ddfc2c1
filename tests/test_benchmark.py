"""The benchmark harness end to end on the tiny preset: the output files' structure, not timings."""

from __future__ import annotations

import csv
import json

from deepcache_compile.cli import main


def test_bench_writes_rows_table_and_plot(tmp_path, capsys):
    main(["bench", "--preset", "tiny-sd", "--resolution", "64", "--steps", "4", "--interval", "2", "3",
          "--backend", "eager", "--baseline", "unet-eager", "reference-helper", "--repeats", "2", "--min-run-time", "0.2",
          "--out", str(tmp_path)])
    stem = tmp_path / "tiny-sd_64px_b2_branch1"
    rows = json.loads(stem.with_suffix(".json").read_text())
    names = [r["name"] for r in rows]
    assert names[0] == "unet-eager"
    assert "deepcache eager uniform N=2" in names and "deepcache eager nonuniform N=2" in names
    for r in rows:
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["threads"] >= 1 and r["torch"]
        if r["name"].startswith("deepcache"):
            assert 1 < r["mac_bound_speedup"] < r["steps"] and 0 < r["dispatch_efficiency"]
            assert r["shallow_gmacs"] < r["full_gmacs"]
    with open(stem.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "| configuration |" in capsys.readouterr().out
