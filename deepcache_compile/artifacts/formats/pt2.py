"""`pt2`: `torch.export.save` programs; torch alone loads them (any device, any later torch that reads them)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import RANGES_KEY, ranges_text

SUFFIX = ".pt2"
TIED_TO = None
WRITE_OPTIONS: tuple[str, ...] = ()
GRAPH_OPTIONS: tuple[str, ...] = ()
LOAD_OPTIONS: tuple[str, ...] = ()


def write(program: torch.export.ExportedProgram, path: Path, io, ranges) -> list[Path]:
    torch.export.save(program, str(path), extra_files={RANGES_KEY: ranges_text(ranges)})
    return [path]


def load(path: Path, device: torch.device):
    # The engine checks every new shape against the manifest's ranges (ShapeRanges.check). The program's own
    # guards can be narrower than its range constraints: tracing a one-channel convolution at batch 2 adds
    # `batch > 1` (the fake conv kernel's stride choice) although the program is exported for batch 1..N and
    # runs batch 1 correctly; checked by tests/test_policy.py at batch 1 from a batch-2 example.
    extra = {RANGES_KEY: ""}
    module = torch.export.load(str(path), extra_files=extra).module(check_guards=False)
    module.to(device)
    module.compiled_ranges = extra[RANGES_KEY]  # "" where the file has none
    return module
