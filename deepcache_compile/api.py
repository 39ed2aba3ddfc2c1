"""The front door: `compile_deepcache` and `list_branches` wire the stages together, nothing else."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .calls import CallFlattener, example_call
from .config import DeepCacheConfig
from .graph.cuts import find_cuts
from .graph.macs import graph_macs, node_macs
from .graph.partition import split_at_branch
from .graph.trace import TracedUNet, trace_unet
from .policy import RefreshPolicy, resolve_policy
from .precision import Int8
from .refresh import AdaptiveRefresh, CalibratedPlan
from .artifacts.cache import CACHE_DIR_ENV
from .runtime.backends import choose_backend, takes_compile_cache
from .runtime.dispatch import DeepCacheUNet
from .schedule import DEFAULT_CENTER, DEFAULT_POWER, make_schedule

__all__ = ["compile_deepcache", "list_branches", "BranchInfo"]

logger = logging.getLogger(__name__)


def compile_deepcache(
    unet: nn.Module,
    branch: int,
    interval: int | None = None,
    *,
    schedule: str | Sequence[int] | CalibratedPlan = "uniform",
    num_inference_steps: int | None = None,
    center: int = DEFAULT_CENTER,
    power: float = DEFAULT_POWER,
    always_full_first: int = 0,
    always_full_last: int = 0,
    backend: str = "eager",
    backend_options: dict[str, Any] | None = None,
    calls_per_step: int = 1,
    max_signatures: int = 4,
    verify: bool = True,
    on_weight_change: str = "recompile",
    dynamic: bool | dict[str, tuple[int, int]] = False,
    outside_ranges: str = "error",
    refresh: str | RefreshPolicy | None = None,
    split: str = "auto",
    forecast: bool = False,
    last_blocks: int = 0,
    quantize: Int8 | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DeepCacheUNet:
    """Wraps `unet` so that it runs DeepCache; use it as `pipe.unet`.

    Graphs are traced lazily, one pair per input signature, on the first call with that signature (or
    ahead of time with `dc.prepare(**call)`). The U-Net itself is never modified.

    Args:
        unet: a diffusers U-Net (UNet2DConditionModel, UNet2DModel, ...), in eval mode.
        branch: the deepest skip recomputed on shallow steps; `list_branches(unet)` lists the valid ones.
        interval: N of the 1:N schedule (default 3, `schedule.DEFAULT_INTERVAL`). Not used with an explicit
            list of full steps.
        schedule: "uniform", "nonuniform", an explicit list of full steps starting at 0, or a `CalibratedPlan`
            (`dc.calibrate(...)`: the full steps chosen from one recorded generation).
        num_inference_steps: total steps; needed by "nonuniform" and `always_full_last`.
        center: the nonuniform schedule's center step.
        power: the nonuniform schedule's power.
        always_full_first: the first this-many steps are always full.
        always_full_last: the last this-many steps are always full.
        backend: "eager" (the reference), "inductor", "aoti", "onnxruntime" or "tensorrt" (CUDA); see
            `available_backends()`. "auto": the fastest installed backend for the U-Net's device and dtype, as
            the benchmark measured it (`choose_backend`; CPU: onnxruntime in fp32, inductor in bf16); the
            choice is logged and is `dc.deepcache_config.backend`.
        backend_options: passed to the backend (inductor: mode, fullgraph, dynamic, options, freezing,
            attention; aoti: inductor_configs, share_weights, attention; onnxruntime: providers,
            session_options; tensorrt: torch_tensorrt options). attention: "auto" (default), "native" or
            "sdpa": bf16 attention on the project's CPU kernel (`graph.attention`).
        calls_per_step: 2 for pipelines that call the U-Net twice per step (conditional, unconditional).
        max_signatures: how many input signatures keep a compiled pair.
        verify: check each compiled pair once against the eager graphs (one extra call of each, per signature).
        on_weight_change: "recompile" or "error" when a generation starts on weights that changed since the
            pairs were compiled (checked once per generation; see `DeepCacheUNet`).
        dynamic: False: one pair per exact input shape (at most `max_signatures`). True, or a dict of (min, max)
            ranges for "batch", "height", "width" (U-Net input pixels): one pair, traced with symbolic sizes
            and compiled once, serves every shape in the ranges (defaults in `ShapeRanges.resolve`).
        outside_ranges: with `dynamic`, what a call the pair cannot serve gets (outside the ranges, or a size
            that is not a multiple of the downsampling factor): "error", or "static" (a static pair for it).
        refresh: "adaptive" or an `AdaptiveRefresh(threshold, max_skip, lagged)`: refresh the cache when the
            head's features drift, instead of on the schedule (which is then unused); or any policy registered
            with `register_policy` (by name) or implementing `policy.RefreshPolicy`.
        split: "auto" (head/deep/tail graphs for adaptive refresh, the full/shallow pair otherwise), "pair" or
            "three".
        forecast: on shallow steps, extrapolate the cached feature from its last two full-step values.
        last_blocks: transformers: how many of the last blocks every step computes besides blocks 0..branch.
        quantize: `Int8(record_calls(unet, run))`: int8 graphs (weights per channel, activations calibrated on the
            recorded calls; see `precision`), on the inductor or aoti backend (eager: the float reference).
        cache_dir: a compile cache shared by processes (`artifacts.cache`; default: the `DEEPCACHE_CACHE_DIR`
            environment variable, for the backends that take one): compiled graphs are stored under a key of
            the weights' content, the options, shapes and versions, and a later process loads them instead of
            compiling (aoti).

    Example:
        >>> pipe.unet = compile_deepcache(pipe.unet, branch=1, interval=5)
        >>> image = pipe(prompt, num_inference_steps=50).images[0]
    """
    if isinstance(schedule, CalibratedPlan):
        if interval is not None or num_inference_steps not in (None, schedule.total):
            raise ValueError(f"a calibrated plan fixes its full steps and its step count ({schedule.total}): do not "
                             "pass interval or another num_inference_steps with it")
        plan = schedule.schedule
    else:
        plan = make_schedule(schedule, interval, num_inference_steps, center, power, always_full_first,
                             always_full_last)
    if backend == "auto":
        backend = _auto_backend(unet, backend_options)
    config = DeepCacheConfig(
        branch=branch,
        schedule=plan,
        backend=backend,
        backend_options=dict(backend_options or {}),
        calls_per_step=calls_per_step,
        max_signatures=max_signatures,
        verify=verify,
        on_weight_change=on_weight_change,
        dynamic=dynamic,
        outside_ranges=outside_ranges,
        refresh=resolve_policy(refresh),
        split=split,
        forecast=forecast,
        last_blocks=last_blocks,
        quantize=quantize,
        cache_dir=_cache_dir(cache_dir, backend),
    )
    return DeepCacheUNet(unet, config)


def _cache_dir(cache_dir, backend: str) -> str | None:
    """The explicit `cache_dir`, else `DEEPCACHE_CACHE_DIR` where the backend takes a compile cache."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    from_env = os.environ.get(CACHE_DIR_ENV) or None
    return from_env if from_env and takes_compile_cache(backend) else None


def _auto_backend(unet: nn.Module, backend_options: dict | None) -> str:
    if backend_options:
        raise ValueError("backend='auto' takes no backend_options (each backend has its own): name the backend")
    weight = next(unet.parameters())
    chosen = choose_backend(weight.device, weight.dtype)
    logger.info("backend='auto' chose %s for %s %s (the fastest measured; see choose_backend)", chosen,
                weight.device.type, str(weight.dtype).removeprefix("torch."))
    return chosen


@dataclass(frozen=True)
class BranchInfo:
    """One row of `list_branches`.

    Attributes:
        index: the branch number to pass as `branch=`.
        producer_module: the module producing the skip tensor, e.g. `down_blocks.0.attentions.0`.
        consumer_module: the up layer that consumes it, e.g. `up_blocks.3.resnets.1`.
        cache_shape: shape of the cached tensor for the example call.
        full_macs: MACs of a full step.
        shallow_macs: MACs of a shallow step at this branch.
    """

    index: int
    producer_module: str
    consumer_module: str
    cache_shape: tuple[int, ...]
    full_macs: int
    shallow_macs: int

    @property
    def mac_share(self) -> float:
        """The shallow step's share of a full step's MACs."""
        return self.shallow_macs / self.full_macs


def list_branches(unet: nn.Module, *args, last_blocks: int = 0, **kwargs) -> list[BranchInfo]:
    """Lists the skip branches of `unet` with the shallow step's MAC share, for one example call.

    Without arguments, a batch-1 call at the config's sample size is used (`calls.example_call`).

    Example:
        >>> for b in list_branches(unet):
        ...     print(b.index, b.consumer_module, f"{b.mac_share:.1%}")
    """
    if not args and not kwargs:
        kwargs = example_call(unet)
    return branch_infos(trace_unet(unet, CallFlattener(unet)(args, kwargs)), last_blocks=last_blocks)


def branch_infos(traced: TracedUNet, **cut_options) -> list[BranchInfo]:
    """`list_branches` for a model already traced with `trace_unet`."""
    macs = node_macs(traced.gm, traced.example_inputs)
    full_macs = sum(macs.values())
    rows = []
    for branch in find_cuts(traced.gm, **{k: v for k, v in cut_options.items() if v}):
        shallow_macs = graph_macs(split_at_branch(traced.gm, branch).shallow, macs)
        rows.append(BranchInfo(branch.index, branch.producer_module, branch.consumer_module,
                               branch.cache_shape, full_macs, shallow_macs))
    return rows
