"""The `aoti` backend: each graph compiled ahead of time by AOTInductor into a package and loaded back.

Options: `inductor_configs` (passed to `aoti_compile_and_package`). The package is written to a temporary
folder that is removed as soon as the loader has opened it (it extracts what it needs): nothing is left in the
temp folder. `dc.export(dir, format="aoti")` writes the same packages as deployable files.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ...artifacts.formats import aoti
from ...graph.trace import export_program
from ...options import check_options
from ...shapes import ShapeRanges

logger = logging.getLogger(__name__)


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any],
                  ranges: ShapeRanges | None = None):
    check_options("the aoti backend", options, aoti.WRITE_OPTIONS)
    program = export_program(gm, example_inputs, ranges)
    with tempfile.TemporaryDirectory(prefix="deepcache_aoti_") as tmp:
        path = Path(tmp) / f"{type(gm).__name__}{aoti.SUFFIX}"
        aoti.package(program, path, options.get("inductor_configs"))
        runner = aoti.load(path, example_inputs[0].device)
    logger.info("AOTInductor compiled %s", type(gm).__name__)
    return runner
