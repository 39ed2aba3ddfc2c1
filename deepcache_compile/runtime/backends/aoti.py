"""The `aoti` backend: each graph compiled ahead of time by AOTInductor into a package and loaded back.

Options: `inductor_configs` (passed to `aoti_compile_and_package`), `share_weights` (default True: the compiled
graphs read the U-Net's own weights where they are, through AOTInductor's user-managed constants, instead of a
copy in the package: one copy of the weights in the process, measured with `bench/weights_memory.py`; False: the
package holds its own copy, as an exported engine file does, and `dc.release_weights()` can free the U-Net's).
The package is written to a temporary folder that is removed as soon as the loader has opened it (it extracts
what it needs): nothing is left in the temp folder. `dc.export(dir, format="aoti")` writes packages with their
weights, as deployable files.
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
    check_options("the aoti backend", options, (*aoti.WRITE_OPTIONS, "share_weights"))
    share = options.get("share_weights", True)
    if not isinstance(share, bool):
        raise TypeError(f"the aoti backend's share_weights is True or False, not {share!r}")
    program = export_program(gm, example_inputs, ranges)
    # The program's parameters and buffers are the U-Net's own tensors (export lifts them without copying).
    constants = {**program.state_dict, **program.constants} if share else None
    with tempfile.TemporaryDirectory(prefix="deepcache_aoti_") as tmp:
        path = Path(tmp) / f"{type(gm).__name__}{aoti.SUFFIX}"
        aoti.package(program, path, options.get("inductor_configs"), weights=not share)
        runner = aoti.load(path, example_inputs[0].device, constants)
    logger.info("AOTInductor compiled %s", type(gm).__name__)
    return runner
