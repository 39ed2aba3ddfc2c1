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

logger = logging.getLogger(__name__)

_COMPILE_KEYS = {"mode", "fullgraph", "dynamic", "options"}


def compile_graph(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], options: dict[str, Any]):
    options = dict(options)
    freezing = options.pop("freezing", example_inputs[0].device.type == "cpu")
    unknown = set(options) - _COMPILE_KEYS
    if unknown:
        raise ValueError(
            f"inductor backend options {sorted(unknown)} are unknown: use {sorted(_COMPILE_KEYS | {'freezing'})}"
        )
    options.setdefault("fullgraph", True)
    compiled = torch.compile(gm, backend="inductor", **options)
    # Compile now, under the chosen freezing setting, instead of on the first denoising step.
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
        compiled(*example_inputs)
    logger.info("inductor compiled %s (freezing=%s)", type(gm).__name__, freezing)
    return compiled
