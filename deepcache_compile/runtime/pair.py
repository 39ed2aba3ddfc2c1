"""One input signature -> a compiled (full, shallow) pair: trace, find branches, partition, compile."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..calls import FlatCall
from ..config import DeepCacheConfig
from ..graph.branches import SkipBranch, find_branches
from ..graph.partition import SplitGraphs, split_at_branch
from ..graph.trace import TracedUNet, trace_unet
from .backends import get_backend

logger = logging.getLogger(__name__)

__all__ = ["CompiledPair", "compile_pair", "select_branch"]


@dataclass(frozen=True)
class CompiledPair:
    """The compiled full and shallow graphs of one input signature.

    Attributes:
        traced: the exported U-Net both graphs were cut from.
        split: the graph modules before compilation.
        full: compiled `(*inputs) -> (sample, cache)`.
        shallow: compiled `(*inputs, cache) -> (sample,)`.
    """

    traced: TracedUNet
    split: SplitGraphs
    full: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    shallow: Callable[..., tuple[torch.Tensor]]

    @property
    def branch(self) -> SkipBranch:
        return self.split.branch

    def run_shallow(self, *inputs: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """Runs the shallow graph after checking that `cache` fits it (the dispatcher skips this check)."""
        shape, dtype = self.branch.cache_shape, self.branch.cache_dtype
        if tuple(cache.shape) != shape or cache.dtype != dtype:
            raise ValueError(
                f"cache of shape {tuple(cache.shape)} and dtype {cache.dtype} does not match the shallow graph's "
                f"cache input {shape}/{dtype} for branch {self.branch.index}: pass the cache returned by the full "
                "graph for the same input signature"
            )
        return self.shallow(*inputs, cache)[0]


def select_branch(branches: tuple[SkipBranch, ...], branch: int) -> SkipBranch:
    if not 0 <= branch < len(branches):
        raise ValueError(
            f"branch={branch} is out of range for this U-Net: valid branches are 0..{len(branches) - 1} "
            "(see list_branches(unet))"
        )
    return branches[branch]


def compile_pair(unet: nn.Module, call: FlatCall, config: DeepCacheConfig) -> CompiledPair:
    """Traces `unet` for the signature of `call`, cuts it at `config.branch` and compiles both graphs.

    Example:
        >>> call = CallFlattener(unet)(args, kwargs)
        >>> pair = compile_pair(unet, call, DeepCacheConfig(branch=1))
        >>> sample, cache = pair.full(*call.tensors)
    """
    traced = trace_unet(unet, call)
    branch = select_branch(find_branches(traced.gm), config.branch)
    split = split_at_branch(traced.gm, branch)
    backend = get_backend(config.backend)
    inputs = traced.example_inputs
    cache = torch.zeros(branch.cache_shape, dtype=branch.cache_dtype, device=inputs[0].device)
    with torch.no_grad():
        full = backend(split.full, inputs, config.backend_options)
        shallow = backend(split.shallow, (*inputs, cache), config.backend_options)
    pair = CompiledPair(traced=traced, split=split, full=full, shallow=shallow)
    if config.backend != "eager" and config.verify:
        verify_pair(pair, config.backend)
    return pair


# Per-call agreement a compiled graph must reach with the eager graph on the example inputs: rounding-level
# differences pass, a miscompilation does not.
_VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def verify_pair(pair: CompiledPair, backend: str) -> None:
    """Runs both compiled graphs once against the eager graphs; raises RuntimeError on a mismatch.

    Costs one eager and one compiled call of each graph, once per signature, outside the hot path.
    """
    inputs = pair.traced.example_inputs
    with torch.no_grad():
        expected, cache = pair.split.full(*inputs)
        checks = (("full", pair.full(*inputs)[0], expected),
                  ("shallow", pair.shallow(*inputs, cache)[0], pair.split.shallow(*inputs, cache)[0]))
    for part, actual, reference in checks:
        error = ((actual.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-6)).item()
        if not error <= _VERIFY_TOLERANCE.get(reference.dtype, 1e-3):
            raise RuntimeError(
                f"the {backend} backend's {part} graph differs from the eager graph by {error:.3g} (relative max) "
                f"for branch {pair.branch.index}: a miscompilation. Use another backend (see available_backends()), "
                "or pass verify=False to compile_deepcache to skip this check"
            )
