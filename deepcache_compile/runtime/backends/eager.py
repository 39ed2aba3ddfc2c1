"""The `eager` backend: runs the graph module as it is. The reference every other backend is tested against."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ...options import check_options


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    check_options("the eager backend", options, ())
    return gm
