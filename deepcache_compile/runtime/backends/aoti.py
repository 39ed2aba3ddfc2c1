"""The `aoti` backend: each graph compiled ahead of time by AOTInductor into a package and loaded back.

Options: `inductor_configs` (passed to `aoti_compile_and_package`), `share_weights` and `attention` ("auto",
"native" or "sdpa": bf16 attention on the project's CPU kernel, as for the inductor backend; the package then
calls `torch.ops.deepcache.attention_bf16`, which AOTInductor runs through the dispatcher). The default is the fast
one, as for the inductor backend: on CPU with static shapes the graphs are frozen (Inductor folds the weights
into the package and pre-packs the convolution weights for oneDNN), which needs their own copy of the weights;
elsewhere (CUDA, dynamic pairs) freezing gains nothing here and the graphs share the U-Net's weights.
`share_weights=True` on CPU keeps one copy of the weights in the process, at a cost in speed (SD 1.5, 256 px,
batch 2, N=5: 1.35-1.53x the frozen copy's time in two runs, `bench/results/sd15_aoti/`); `share_weights=False` with
`inductor_configs={'freezing': False}` is a copy without the speed. Shared graphs read the U-Net's own tensors
through AOTInductor's user-managed constants (the package is compiled without constants); graphs with their own
copy let `dc.release_weights()` free the U-Net's.
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

from ...artifacts.cache import CompileCache, graph_key, graph_tensors
from ...artifacts.formats import aoti
from ...graph.trace import export_program
from ...options import check_options
from ...shapes import ShapeRanges

logger = logging.getLogger(__name__)

GRAPH_OPTIONS = aoti.GRAPH_OPTIONS  # "attention": applied by graph.passes before the graph reaches this backend
COMPILE_CACHE = True  # takes `cache=` (artifacts.cache): packages stored and loaded by key


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any],
                  ranges: ShapeRanges | None = None, cache: CompileCache | None = None):
    check_options("the aoti backend", options, (*aoti.WRITE_OPTIONS, *GRAPH_OPTIONS, "share_weights"))
    configs = dict(options.get("inductor_configs") or {})
    # Freezing pays on CPU with static shapes; set either way, so that the process-wide setting does not decide.
    freezing = configs.get("freezing", example_inputs[0].device.type == "cpu" and ranges is None)
    share = options.get("share_weights", not freezing)
    if not isinstance(share, bool):
        raise TypeError(f"the aoti backend's share_weights is True or False, not {share!r}")
    if share and configs.get("freezing"):
        raise ValueError("the aoti backend cannot share the U-Net's weights with frozen graphs (freezing replaces "
                         "them by packed copies): pass share_weights=False for frozen graphs with their own "
                         "weights, or inductor_configs={'freezing': False} to share")
    configs["freezing"] = freezing and not share
    if cache is not None:
        return _cached(gm, example_inputs, options, ranges, cache, configs, share)
    program = export_program(gm, example_inputs, ranges)
    # The program's parameters and buffers are the U-Net's own tensors (export lifts them without copying).
    constants = {**program.state_dict, **program.constants} if share else None
    with tempfile.TemporaryDirectory(prefix="deepcache_aoti_") as tmp:
        path = Path(tmp) / f"{type(gm).__name__}{aoti.SUFFIX}"
        aoti.package(program, path, configs, weights=not share)
        runner = aoti.load(path, example_inputs[0].device, constants, unpack=False)  # the folder goes
    logger.info("AOTInductor compiled %s (share_weights=%s, freezing=%s)", type(gm).__name__, share,
                configs["freezing"])
    return runner


def _cached(gm: fx.GraphModule, example_inputs: tuple, options: dict, ranges, cache: CompileCache, configs: dict,
            share: bool):
    """The package from the compile cache, compiled into it on a miss. A package that shares the U-Net's weights
    holds none: its constants are bound by name to the graph's own tensors, as for a fresh compile."""
    key = graph_key("aoti", gm, example_inputs, {**options, "inductor_configs": configs, "share": share}, ranges)
    name = "graph" + aoti.SUFFIX
    path = cache.get(key, name) or cache.put(
        key, name, lambda p: aoti.package(export_program(gm, example_inputs, ranges), p, configs, weights=not share))
    runner = aoti.load(path, example_inputs[0].device, graph_tensors(gm) if share else None)
    logger.info("AOTInductor %s through the compile cache in %s (share_weights=%s, freezing=%s)", type(gm).__name__,
                cache.directory, share, configs["freezing"])
    return runner
