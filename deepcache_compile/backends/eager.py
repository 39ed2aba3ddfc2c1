"""The `eager` backend: runs the graph module as it is. The reference every other backend is tested against."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    if options:
        raise ValueError(f"the eager backend takes no options, got {sorted(options)}")
    return gm
