"""The `aoti` backend: each graph compiled ahead of time by AOTInductor into a package and loaded back.

Options: `inductor_configs` (passed to `aoti_compile_and_package`). The packages are the same files that
`dc.export(dir, format="aoti")` ships, loadable from C++ with `AOTIModelPackageLoader`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

logger = logging.getLogger(__name__)


def package(program: torch.export.ExportedProgram, path: Path, inductor_configs: dict | None = None) -> Path:
    """Compiles `program` with AOTInductor into the package file `path`."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=inductor_configs)
    return path


def load(path: Path, device: torch.device | str = "cpu"):
    """Loads an AOTInductor package: a callable `(*tensors) -> list[tensor]`."""
    device = torch.device(device)
    index = -1 if device.type == "cpu" else (device.index or 0)
    return torch._inductor.aoti_load_package(str(path), device_index=index)


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    unknown = set(options) - {"inductor_configs"}
    if unknown:
        raise ValueError(f"aoti backend options {sorted(unknown)} are unknown: use inductor_configs")
    program = torch.export.export(gm, example_inputs, strict=False)
    path = Path(tempfile.mkdtemp(prefix="deepcache_aoti_")) / f"{type(gm).__name__}.pt2"
    package(program, path, options.get("inductor_configs"))
    runner = load(path, example_inputs[0].device)
    logger.info("AOTInductor package %s", path)
    return lambda *tensors: tuple(runner(*tensors))
