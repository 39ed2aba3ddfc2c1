"""Frozen, validated configuration of a DeepCache U-Net."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .policy import RefreshPolicy
from .precision import INT8_BACKENDS, Int8
from .runtime.backends import available_backends, takes_compile_cache
from .schedule import Schedule

__all__ = ["DeepCacheConfig"]


@dataclass(frozen=True)
class DeepCacheConfig:
    """What to cut, when to run it, and how to compile it.

    Attributes:
        branch: the deepest skip recomputed on shallow steps (see `list_branches`).
        schedule: which steps are full (default: uniform 1:3).
        backend: one of `available_backends()`: "eager" (the reference), "inductor", "aoti", "onnxruntime",
            "tensorrt" (CUDA), or one added with `register_backend`.
        backend_options: passed to the backend (for inductor: mode, fullgraph, dynamic, options, freezing).
        calls_per_step: U-Net calls per denoising step. 2 for pipelines that call the U-Net separately for the
            conditional and unconditional halves: each call slot then keeps its own cache.
        max_signatures: how many input signatures (shape/dtype/optional-input sets) keep a compiled pair.
        verify: check each compiled pair once against the eager graphs (non-eager backends).
        dynamic: None (or False) for one compiled pair per exact input shape; else the (min, max) ranges one
            dynamic pair serves: a dict with any of "batch", "height", "width" (height/width in U-Net input pixels,
            a transformer's latent pixels; defaults in `ShapeRanges.resolve`, a transformer's one resolution) and,
            for packed-token samples (Flux), "tokens"; `{}` (or True) for the defaults. Stored as None or a dict.
        outside_ranges: what a call the dynamic pair cannot serve gets (a size outside the ranges or not a
            multiple of the U-Net's downsampling factor): "error", or "static" (a static pair for its shape).
        on_weight_change: what a generation does when it finds the U-Net's weights changed since its pairs were
            compiled (`load_state_dict`, `fuse_lora`, `.to(dtype)`, in-place edits): "recompile" (drop the
            pairs; they are traced and compiled again) or "error".
        refresh: None (the schedule decides) or another refresh policy (`policy.RefreshPolicy`: an
            `AdaptiveRefresh`, where the drift of the features decides, or one registered with `register_policy`);
            `schedule` is then unused.
        split: "pair" (full and shallow graphs), "three" (head, deep and tail graphs: a full step runs all three,
            a shallow step head and tail), "step" (probe policies: one graph per step that decides on the device
            with `torch.cond`, no host read: `graph.step`) or "auto" (three for probe policies, else the pair).
        forecast: on shallow steps, extrapolate the cached feature from its last two full-step values
            (first order, fused into the shallow graph) instead of reusing it as it is.
        last_blocks: transformers only: how many of the last blocks every step computes (0: the cached range
            runs to the last block, the first-block-cache layout; 1 or more: DBCache's Fn-Bn layout).
        quantize: None (the model's precision) or `Int8(calls)`: int8 graphs calibrated on the recorded calls
            (`precision`); static pairs with the full/shallow split on the eager, inductor or aoti backend.
        cache_dir: a folder of compiled graphs shared by processes (`artifacts.cache`): a later process loads what
            an earlier one compiled with the same weights, options, shapes and versions (the aoti backend).

    Example:
        >>> DeepCacheConfig(branch=1, schedule=Schedule("uniform", interval=5)).branch
        1
    """

    branch: int
    schedule: Schedule = field(default_factory=Schedule)
    backend: str = "eager"
    backend_options: dict[str, Any] = field(default_factory=dict)
    calls_per_step: int = 1
    max_signatures: int = 4
    verify: bool = True
    on_weight_change: str = "recompile"
    dynamic: dict[str, tuple[int, int]] | bool | None = None
    outside_ranges: str = "error"
    refresh: RefreshPolicy | None = None
    split: str = "auto"
    forecast: bool = False
    last_blocks: int = 0
    quantize: Int8 | None = None
    cache_dir: str | None = None

    @property
    def cut_options(self) -> dict[str, Any]:
        """What the cut finders take besides the graph (see `graph.cuts.find_cuts`)."""
        return {"last_blocks": self.last_blocks} if self.last_blocks else {}

    @property
    def policy(self) -> RefreshPolicy:
        """What decides full or cached steps: `refresh`, else the schedule."""
        return self.schedule if self.refresh is None else self.refresh

    @property
    def graphs(self) -> str:
        """"pair", "three" or "step": the split the compiled pairs use."""
        if self.split in ("three", "step"):
            return self.split
        return "three" if self.split == "auto" and self.policy.uses_probe else "pair"

    def __post_init__(self):
        object.__setattr__(self, "dynamic", _ranges(self.dynamic))
        if not isinstance(self.branch, int) or isinstance(self.branch, bool) or self.branch < 0:
            raise ValueError(
                f"branch={self.branch!r} is invalid: it must be an integer >= 0 (0 = the outermost skip, "
                "see list_branches(unet) for the valid range)"
            )
        if self.backend not in available_backends():
            raise ValueError(f"backend={self.backend!r} is unknown: choose one of {available_backends()}")
        if not isinstance(self.last_blocks, int) or isinstance(self.last_blocks, bool) or self.last_blocks < 0:
            raise ValueError(f"last_blocks={self.last_blocks!r} is invalid: it must be an integer >= 0 (how many of "
                             "a transformer's last blocks every step computes)")
        if self.calls_per_step < 1:
            raise ValueError(f"calls_per_step={self.calls_per_step} must be >= 1 (2 for separate CFG calls)")
        if self.max_signatures < 1:
            raise ValueError(f"max_signatures={self.max_signatures} must be >= 1")
        if self.on_weight_change not in ("recompile", "error"):
            raise ValueError(f"on_weight_change={self.on_weight_change!r} is unknown: use 'recompile' or 'error'")
        if self.outside_ranges not in ("error", "static"):
            raise ValueError(f"outside_ranges={self.outside_ranges!r} is unknown: use 'error' or 'static'")
        if self.split not in ("auto", "pair", "three", "step"):
            raise ValueError(f"split={self.split!r} is unknown: use 'auto', 'pair', 'three' or 'step'")
        if self.refresh is not None and not isinstance(self.refresh, RefreshPolicy):
            raise ValueError(f"refresh={self.refresh!r} is not a refresh policy: pass AdaptiveRefresh(...), "
                             "'adaptive', or an object with uses_probe, exportable and controller() (see "
                             "deepcache_compile.policy; a calibrated plan is a schedule: schedule=plan)")
        if self.policy.uses_probe and self.split == "pair":
            raise ValueError("adaptive refresh decides after the head graph ran, so it needs the three-graph split: "
                             "pass split='three' or split='auto'")
        if self.split == "step":
            self._check_step()
        if self.quantize is not None:
            self._check_int8()
        if self.cache_dir is not None and not takes_compile_cache(self.backend):
            raise ValueError(f"cache_dir: the {self.backend} backend keeps no compiled files to cache; the aoti "
                             "backend does (backend='aoti'), and engine files load without compiling (dc.export)")
        if self.dynamic is not None:
            unknown = set(self.dynamic) - {"batch", "height", "width", "tokens"}
            if unknown:
                raise ValueError(f"dynamic={self.dynamic!r} has unknown keys {sorted(unknown)}: use 'batch', "
                                 "'height' and 'width' ('tokens' for packed-token samples), each a (min, max) pair")
            for key, value in self.dynamic.items():
                if not (isinstance(value, (tuple, list)) and len(value) == 2
                        and all(isinstance(v, int) and v >= 1 for v in value) and value[0] <= value[1]):
                    raise ValueError(f"dynamic[{key!r}]={value!r} is not a range: use a (min, max) pair of "
                                     "integers with 1 <= min <= max")

    def _check_step(self) -> None:
        if not hasattr(self.policy, "device_rule"):
            raise ValueError(f"split='step' decides on the device with the rule of a probe policy (AdaptiveRefresh, "
                             f"FirstBlockRefresh), not {type(self.policy).__name__}: fixed schedules need no decision "
                             "(use split='pair')")
        self.policy.device_rule()  # a policy without a device form refuses here, naming why
        for given, what in ((self.dynamic is not None, "dynamic="), (self.forecast, "forecast=True")):
            if given:
                raise ValueError(f"split='step' compiles static step graphs that reuse the cache as it is: drop {what} "
                                 "(or use split='three', decided on the host)")

    def _check_int8(self) -> None:
        if not isinstance(self.quantize, Int8):
            raise TypeError(f"quantize={self.quantize!r}: pass Int8(record_calls(model, run)) or None")
        if self.backend not in INT8_BACKENDS:
            raise ValueError(f"quantize=Int8(...) runs on the backends {INT8_BACKENDS} (Inductor lowers it to "
                             f"oneDNN int8 kernels; eager is the float reference), not {self.backend!r}")
        if self.dynamic is not None:
            raise ValueError("quantize=Int8(...) compiles static pairs (calibrated per input signature): drop dynamic=")
        if self.graphs == "three":
            raise ValueError("quantize=Int8(...) quantizes the full/shallow pair: refresh policies that decide from "
                             "the head graph (adaptive refresh) and split='three' are not quantized")


def _ranges(dynamic) -> dict | None:
    """`dynamic` as stored: None (static pairs) or a dict of (min, max) tuples (True: the defaults, `{}`)."""
    if dynamic is True:
        return {}
    if dynamic is False or dynamic is None:
        return None
    if not isinstance(dynamic, dict):
        raise TypeError(f"dynamic={dynamic!r}: pass True, False, or a dict like dict(batch=(1, 8), "
                        "height=(256, 1024), width=(256, 1024))")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dynamic.items()}
