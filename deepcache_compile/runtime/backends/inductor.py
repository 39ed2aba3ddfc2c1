"""The `inductor` backend: `torch.compile` on each graph, compiled ahead of time on the example inputs.

Options are passed to `torch.compile` (`mode`, `fullgraph`, `dynamic`, `options`), plus `freezing`:
Inductor's freezing folds the (shared, read-only) weights into the compiled graph, which lets it pre-pack
convolution weights for oneDNN on CPU. It defaults to on for CPU inputs. A frozen graph keeps its own copy of
the weights it uses, so moving or editing the U-Net's weights afterwards does not reach it: compile again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from ...options import check_options

logger = logging.getLogger(__name__)

_COMPILE_KEYS = {"mode", "fullgraph", "dynamic", "options"}


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    check_options("the inductor backend", options, _COMPILE_KEYS | {"freezing"})
    options = dict(options)
    freezing = options.pop("freezing", example_inputs[0].device.type == "cpu")
    options.setdefault("fullgraph", True)
    compiled = torch.compile(gm, backend="inductor", **options)
    # Compile now, under the chosen freezing setting, instead of on the first denoising step.
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
        compiled(*example_inputs)
    logger.info("inductor compiled %s (freezing=%s)", type(gm).__name__, freezing)
    return compiled
