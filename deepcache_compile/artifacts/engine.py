"""Engine files + manifest -> a DeepCache U-Net that runs without diffusers' model code.

`load_deepcache` verifies the manifest (`manifest.read_manifest`: format version, the library versions a
format is tied to, every file's size and sha256) before it opens anything, then loads the pair with the
format's own runtime (`formats/`): torch alone for `.pt2`, torch's AOTInductor loader for `.aoti.pt2`,
onnxruntime for ONNX, TensorRT for `.plan`. `DeepCacheEngine` has the call interface and schedule of
`DeepCacheUNet` and runs the same generation logic (`runtime.generation`). Engines that call the project's own
kernels (the manifest's `native_ops`) load them first (`manifest.check_native_ops`). Nothing here imports the graph
passes or diffusers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..calls import FlatCall
from ..runtime.generation import GenerationStates, StepGraphs, check_finite, run_step, timestep_mark
from ..policy import StepState
from ..refresh import AdaptiveRefresh, FirstBlockRefresh
from ..schedule import Schedule
from ..shapes import ShapeRanges, with_batch
from .manifest import ManifestError

logger = logging.getLogger(__name__)

__all__ = ["DeepCacheEngine", "EngineOutput", "ManifestError"]


@dataclass
class EngineOutput:
    """The U-Net output: `.sample`, like diffusers' `UNet2DConditionOutput`."""

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


class EngineConfig(dict):
    """The source U-Net's config, readable as attributes (`config.in_channels`) like diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the exported U-Net's config has no {name!r}") from None


class DeepCacheEngine(nn.Module):
    """A loaded DeepCache pair with the U-Net's call interface and the exported schedule.

    Example:
        >>> engine = load_deepcache("engines/sd15-b1")
        >>> out = engine(latents, t, encoder_hidden_states=text).sample
    """

    def __init__(self, manifest: dict, parts: dict | None, device: torch.device):
        """`parts`: the loaded graphs by part name, "full" and "shallow", or "head", "deep" and "tail" for an
        adaptive-refresh export (the manifest's `policy`); None where another runtime runs them (native)."""
        super().__init__()
        self.manifest = manifest
        self._parts, self._device = parts or {}, device
        policy = manifest.get("policy")
        if policy is not None and policy.get("decided") == "device":  # one step program deciding on the device
            self._graphs = StepGraphs(None, None, step=self._parts.get("step"),
                                      step_state=StepState.from_manifest(policy["state"]))
            rule = AdaptiveRefresh if policy["name"] == "adaptive" else FirstBlockRefresh
            self.schedule = rule(threshold=policy["threshold"], max_skip=policy["max_skip"])
        elif policy is not None:  # adaptive refresh: head -> [deep] -> tail, deciding from the head's probe
            three = SimpleNamespace(head=self._parts.get("head"), deep=self._parts.get("deep"),
                                    tail=self._parts.get("tail"), probe=policy["probe"])
            self._graphs = StepGraphs(None, None, three=three)
            self.schedule = AdaptiveRefresh(threshold=policy["threshold"], max_skip=policy["max_skip"])
        else:
            self._graphs = StepGraphs(self._parts.get("full"), self._parts.get("shallow"),
                                      forecast=bool(manifest.get("forecast")))
            self.schedule = Schedule(**{**manifest["schedule"], "steps": tuple(manifest["schedule"]["steps"])})
        self.config = EngineConfig(manifest["unet"]["config"])
        compiled = ShapeRanges.from_manifest(manifest["ranges"])
        # A model traced only from batch pad_batch (`runtime.pair.trace_in_ranges`): smaller calls are padded.
        self._pad = manifest.get("pad_batch", 1)
        self.ranges = dataclasses.replace(compiled, batch=(1, compiled.batch[1])) if self._pad > 1 else compiled
        self._inputs = [(i["name"], getattr(torch, i["dtype"]), i["rank"]) for i in manifest["inputs"]]
        self._params = manifest["unet"]["forward_params"]
        self._known = frozenset(name.split(".")[0] for name, _, _ in self._inputs)
        self._names = tuple(name for name, _, _ in self._inputs)
        self._states = GenerationStates(manifest["calls_per_step"])
        self._checked: set = set()
        features = manifest["unet"]["add_embedding_in_features"]
        if features is not None:  # SDXL pipelines read unet.add_embedding.linear_1.in_features
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=features))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["unet"]["dtype"].removeprefix("torch."))

    @property
    def device(self) -> torch.device:
        return self._device

    def reset(self) -> None:
        """The next call (in this thread, or this `generation()` block) starts a new generation (a full step)."""
        self._states.current().reset()

    def generation(self):
        """A block whose calls form one generation of their own (see `DeepCacheUNet.generation`)."""
        return self._states.generation()

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """diffusers' `CacheMixin.cache_context`, which transformer pipelines (Flux, Wan and others) enter around
        each model call to tell diffusers' cache hooks which call it is: an engine runs no such hook (its schedule
        is its own), so the block only runs its body."""
        yield

    def full_steps(self, total: int | None = None) -> list[int]:
        if self.schedule.uses_probe:
            raise ValueError("adaptive refresh decides each step from the features: there is no fixed list of "
                             "full steps (see .history after a generation)")
        return self.schedule.full_steps(total)

    def with_schedule(self, policy) -> "DeepCacheEngine":
        """The same loaded graphs run on another schedule or refresh policy (`policy.RefreshPolicy`) that decides
        from the step alone (engine files hold the full and shallow graphs, not the head a probe needs)."""
        if policy.uses_probe or self.schedule.uses_probe:
            raise ValueError("an engine's graphs belong to its kind of policy: export again for adaptive refresh "
                             "(head/deep/tail graphs), or for a schedule (full and shallow graphs)")
        other = type(self)(self.manifest, self._parts, self._device)
        other.schedule = policy
        return other

    @property
    def step(self) -> int:
        """Index of the next step within the current generation."""
        return self._states.current().step

    @property
    def shape_ranges(self) -> ShapeRanges:
        """The sample shapes the engine serves (as `DeepCacheUNet.shape_ranges`)."""
        return self.ranges

    @property
    def history(self) -> str:
        """What the current (or last) generation ran, one letter per U-Net call: "F" full, "S" shallow."""
        return self._states.current().history

    def forward(self, *args, return_dict: bool = True, **kwargs):
        given = dict(zip(self._params, args), **kwargs)
        tensors = self._flatten(given)
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if signature not in self._checked:
            self.ranges.check(tuple(tensors[0].shape))
            self._checked.add(signature)
        rows = tensors[0].shape[0]
        padded = rows < self._pad
        if padded:  # rows repeated up to the compiled batch; the cache is kept at that batch too
            tensors = with_batch(tensors, self._pad)
        call = FlatCall(signature, tensors, given.get("timestep"), return_dict)
        state, mark = self._states.current(), timestep_mark(call.timestep)
        if state.starts_generation(signature, mark):
            check_finite(tensors, self._names)
        sample = run_step(state, self.schedule, call, self._graphs, mark)
        if padded:
            sample = sample[:rows]
        return EngineOutput(sample) if return_dict else (sample,)

    def _flatten(self, given: dict) -> tuple[torch.Tensor, ...]:
        tensors = []
        for name, dtype, rank in self._inputs:
            value = _lookup(given, name)
            if value is None:
                raise ValueError(f"input {name!r} is missing: this export was traced with inputs "
                                 f"{[n for n, _, _ in self._inputs]}")
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=dtype, device=self._device)
            if value.dim() != rank:
                value = value.reshape(-1)[:1].reshape(()) if rank == 0 else value.expand(given["sample"].shape[0])
            tensors.append(value.to(device=self._device, dtype=dtype))
        _refuse_extra(given, self._known)
        return tuple(tensors)


def _lookup(given: dict, name: str):
    value: Any = given
    for key in name.split("."):
        if value is None:
            return None
        value = value[int(key)] if isinstance(value, (list, tuple)) else value.get(key)
    return value


def _refuse_extra(given: dict, known: set[str]) -> None:
    extra = [k for k, v in given.items() if v is not None and k not in known
             and not (isinstance(v, dict) and all(x is None for x in v.values()))]  # {} or {"resolution": None}
    if extra:
        raise ValueError(f"inputs {extra} were not part of the exported call: export again with them, or drop them")
