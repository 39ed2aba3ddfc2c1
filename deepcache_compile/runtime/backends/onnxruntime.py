"""The `onnxruntime` backend: each graph exported to ONNX (torch.onnx, dynamo) and run by an InferenceSession.

Options: `providers` (default: CUDA when the inputs are on CUDA and onnxruntime-gpu has it, else CPU),
`session_options` (a dict of `onnxruntime.SessionOptions` attributes, and of session config entries by their dotted
names, e.g. {"session.intra_op.allow_spinning": "0"}). The ONNX files go to a temporary folder
that is removed once the session holds the weights: nothing is left in the temp folder.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ...artifacts.formats.onnx import OrtRunner, write_onnx
from ...graph.trace import export_program
from ...options import check_options
from ...shapes import ShapeRanges

logger = logging.getLogger(__name__)


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any],
                  ranges: ShapeRanges | None = None):
    check_options("the onnxruntime backend", options, ("providers", "session_options"))
    program = export_program(gm, example_inputs, ranges)
    names = [f"input_{i}" for i in range(len(example_inputs))]
    outputs = [f"output_{i}" for i in range(len(gm.graph.output_node().args[0]))]
    with tempfile.TemporaryDirectory(prefix="deepcache_ort_") as tmp:
        path = Path(tmp) / f"{type(gm).__name__}.onnx"
        write_onnx(program, path, names, outputs)
        runner = OrtRunner(path, example_inputs[0].device, **options, names=names)
    logger.info("onnxruntime session for %s on %s", type(gm).__name__, runner.session.get_providers())
    return runner
