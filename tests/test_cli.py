"""The command line and the demo, on the tiny preset (structure, not timings)."""

from __future__ import annotations

from deepcache_compile.cli import main


def test_branches_command_prints_the_table(capsys):
    main(["branches", "--preset", "tiny-sd"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "branch" and len(lines) == 1 + 12
    assert lines[1].split()[1] == "conv_in" and lines[1].endswith("%")


def test_demo_runs_end_to_end_on_the_tiny_preset(capsys):
    main(["demo", "--preset", "tiny-sd", "--resolution", "64", "--backends", "eager", "--steps", "3",
          "--repeats", "1", "--min-run-time", "0.1"])
    out = capsys.readouterr().out
    assert "exact" in out and "False" not in out
    loop = [line for line in out.splitlines() if line.strip().startswith("eager")]
    assert len(loop) == 1 and loop[0].split()[-1] == "1"  # one full step of 3 at N=5
