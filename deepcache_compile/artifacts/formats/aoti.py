"""`aoti`: AOTInductor packages, compiled for the export machine's device and torch version.

Loaded in Python with `torch._inductor.aoti_load_package`, or from C++ with `AOTIModelPackageLoader`. The loader
extracts the package when it opens it, so the package file may be removed afterwards (the `aoti` backend does).
"""

from __future__ import annotations

from pathlib import Path

import torch

SUFFIX = ".aoti.pt2"
TIED_TO = "torch"
WRITE_OPTIONS = ("inductor_configs",)
LOAD_OPTIONS: tuple[str, ...] = ()


def package(program: torch.export.ExportedProgram, path: Path, inductor_configs: dict | None = None) -> Path:
    """Compiles `program` with AOTInductor into the package file `path`."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=inductor_configs)
    return path


def write(program: torch.export.ExportedProgram, path: Path, io, ranges, inductor_configs: dict | None = None,
          ) -> list[Path]:
    return [package(program, path, inductor_configs)]


def load(path: Path, device: torch.device):
    """Loads an AOTInductor package: a callable `(*tensors) -> tuple[tensor, ...]`."""
    device = torch.device(device)
    index = -1 if device.type == "cpu" else (device.index or 0)
    runner = torch._inductor.aoti_load_package(str(path), device_index=index)

    def run(*tensors):
        return tuple(runner(*tensors))

    run.owns_weights = True  # the package's constants: the U-Net's own tensors are not read
    return run
