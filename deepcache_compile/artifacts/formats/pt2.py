"""`pt2`: `torch.export.save` programs; torch alone loads them (any device, any later torch that reads them)."""

from __future__ import annotations

from pathlib import Path

import torch

SUFFIX = ".pt2"
TIED_TO = None
WRITE_OPTIONS: tuple[str, ...] = ()
GRAPH_OPTIONS: tuple[str, ...] = ()
LOAD_OPTIONS: tuple[str, ...] = ()


def write(program: torch.export.ExportedProgram, path: Path, io, ranges) -> list[Path]:
    torch.export.save(program, str(path))
    return [path]


def load(path: Path, device: torch.device):
    module = torch.export.load(str(path)).module()
    module.to(device)
    return module
