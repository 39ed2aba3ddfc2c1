"""The command line and the demo, on the tiny preset (structure, not timings)."""

from __future__ import annotations

import pytest

from deepcache_compile.eval.cli import main


def test_branches_command_prints_the_table(capsys):
    main(["branches", "--preset", "tiny-sd"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "branch" and len(lines) == 1 + 12
    assert lines[1].split()[:3] == ["0", "conv_in", "up_blocks.3.resnets.2"] and lines[1].endswith("%")


def test_demo_runs_end_to_end_on_the_tiny_preset(capsys):
    main(["demo", "--preset", "tiny-sd", "--resolution", "64", "--backends", "eager", "--steps", "3",
          "--repeats", "1", "--min-run-time", "0.1"])
    out = capsys.readouterr().out
    assert "exact" in out and "False" not in out
    loop = [line for line in out.splitlines() if line.strip().startswith("eager")]
    assert len(loop) == 1 and loop[0].split()[-1] == "1"  # one full step of 3 at N=5


def test_digits_demo_generates_grids_and_prints_speed_and_quality(tmp_path, capsys):
    main(["demo", "--samples", "16", "--steps", "10", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "speedup" in out and "PSNR" in out and "FD" in out
    assert (tmp_path / "digits_full.png").stat().st_size > 500 and (tmp_path / "digits_deepcache.png").exists()


def test_analyze_writes_the_heatmap_and_a_suggestion(tmp_path, capsys):
    import json

    main(["analyze", "--steps", "10", "--batch", "2", "--branch", "0", "3", "--budget", "3",
          "--out", str(tmp_path / "sim.png")])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "sim.json").read_text())
    # The calibrated plans printed are the best 3-step plans for the recorded similarity (brute force).
    import itertools

    import torch

    from deepcache_compile.refresh import reuse_drift

    for b in (0, 3):
        sim = torch.tensor(record["similarity"][str(b)])
        best = min(((0, *r) for r in itertools.combinations(range(1, 10), 2)), key=lambda p: reuse_drift(sim, p))
        assert f"3 full steps of 10 at branch {b}" in out and str(list(best)) in out
    # Each candidate's reuse similarity, recomputed from the recorded matrices: the 10th percentile over the
    # shallow steps of a uniform 1:N schedule of their similarity to the full step they reuse.
    for c in record["candidates"]:
        sim = torch.tensor(record["similarity"][str(c["branch"])])
        full = set(range(0, 10, c["interval"]))
        reused = [sim[t, max(f for f in full if f <= t)].item() for t in range(10) if t not in full]
        # (the record keeps 5 decimals of each similarity)
        assert c["reuse_similarity"] == pytest.approx(torch.quantile(torch.tensor(reused), 0.1).item(), abs=1e-5)
    # On the shipped digits model at 10 steps no candidate keeps its feature above 0.997 (the largest interval
    # steps are too far apart): the suggestion is the refusal, naming the threshold.
    assert max(c["reuse_similarity"] for c in record["candidates"]) < 0.997
    assert "suggestion: no branch keeps its cached feature above cosine similarity 0.997" in out
    assert (tmp_path / "sim.png").stat().st_size > 1000


def test_busy_machine_warning_names_the_spread():
    from deepcache_compile.eval.sampling import busy_warning

    assert busy_warning({"full": [10.0, 10.5, 10.2], "deepcache": [4.0, 4.1, 4.05]}) is None  # 5 % and 2.5 %
    assert busy_warning({"full": [10.0], "deepcache": [4.0]}) is None  # one run: nothing to compare
    assert busy_warning({"full": [10.0, 10.2], "deepcache": [4.0, 6.0]}) == (
        "the machine was busy: deepcache's runs differ by 50% (full 2%); rerun on an idle machine before reading "
        "the speedup")
