"""When to refresh: the one protocol every refresh policy implements, and their registry.

A policy answers, per generation and call slot, "full or reuse at this step?" through a `Controller` it makes
for each generation (`policy.controller(total)`). Policies with `uses_probe` decide after the head graph ran,
from its probe tensor (the three-graph split); the others decide from the step alone, before any graph runs.
The same `run_step` (`runtime/generation.py`) asks them in `DeepCacheUNet`, the Python engine and the
`StepBatcher` alike.

Adding a policy is a class with `uses_probe`, `exportable` and `controller(total)`, and one
`register_policy("name", Class)` line; `compile_deepcache(model, refresh="name")` then runs it.

Example:
    >>> class EveryOther:
    ...     uses_probe, exportable = False, False
    ...     def controller(self, total=None):
    ...         return StepController(lambda step: step % 2 == 0)
    >>> register_policy("every-other", EveryOther)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch

__all__ = ["RefreshPolicy", "Controller", "StepController", "DeviceRule", "StepState", "register_policy",
           "resolve_policy", "available_policies"]


@runtime_checkable
class Controller(Protocol):
    """One generation's (one call slot's) decisions, asked once per step in order."""

    def decide(self, step: int, probe: torch.Tensor | None, size: tuple[int, ...], timestep: Any) -> bool:
        """True where step `step` must run full. `probe`: the head's probe tensor (policies with `uses_probe`),
        else None; `size` the sample's spatial size and `timestep` the call's, for policies that check them."""


@runtime_checkable
class RefreshPolicy(Protocol):
    """A refresh policy: `uses_probe` (decides from the head's probe), `exportable` (engine files can carry it:
    fixed plans, and adaptive refresh with its head/deep/tail graphs), and a fresh `Controller` per generation."""

    uses_probe: bool
    exportable: bool

    def controller(self, total: int | None = None) -> Controller: ...


@dataclass(frozen=True)
class DeviceRule:
    """A probe policy's decision as tensor arithmetic, for the step graph that decides on the device
    (`split="step"`, `graph.step`). Policies that can be decided so offer it as `policy.device_rule()`.

    Attributes:
        threshold: the drift that makes a step full.
        max_skip: at most this many cached steps in a row (None: no limit).
        accumulate: True: the probe's relative L1 change since the step before, summed since the latest full
            step, full when the sum reaches `threshold` (`AdaptiveRefresh`); False: the change since the latest
            full step's probe, full when it exceeds `threshold` (`FirstBlockRefresh`).
    """

    threshold: float
    max_skip: int | None
    accumulate: bool


NO_LIMIT = 2 ** 62  # max_skip=None on the device: the run counter never reaches it


@dataclass(frozen=True)
class StepState:
    """The tensors a device-decided step carries from call to call, as per-row shapes (batch first):
    `(cache, reference, drift, run)`; `initial` makes a generation's first, whose step is full (`run` at the
    limit). Engine manifests hold it (`policy.state`), so that runtimes make the same tensors.

    Attributes:
        cache: the kept tensor's shape without the batch, and `cache_dtype` its dtype.
        probe: the probe's shape without the batch, and `probe_dtype` its dtype.
        limit: `max_skip`, or `NO_LIMIT`.
    """

    cache: tuple[int, ...]
    cache_dtype: torch.dtype
    probe: tuple[int, ...]
    probe_dtype: torch.dtype
    limit: int

    def to_manifest(self) -> dict:
        """The manifest's `policy.state` entry (read by `from_manifest` and the C++ runtime)."""
        return {"cache": list(self.cache), "cache_dtype": str(self.cache_dtype).removeprefix("torch."),
                "probe": list(self.probe), "probe_dtype": str(self.probe_dtype).removeprefix("torch."),
                "limit": self.limit}

    @classmethod
    def from_manifest(cls, state: dict) -> "StepState":
        return cls(cache=tuple(state["cache"]), cache_dtype=getattr(torch, state["cache_dtype"]),
                   probe=tuple(state["probe"]), probe_dtype=getattr(torch, state["probe_dtype"]), limit=state["limit"])

    def initial(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (torch.zeros((batch, *self.cache), dtype=self.cache_dtype, device=device),
                torch.zeros((batch, *self.probe), dtype=self.probe_dtype, device=device),
                torch.zeros((), dtype=torch.float32, device=device),
                torch.full((), self.limit, dtype=torch.int64, device=device))


class StepController:
    """A controller that decides from the step index alone (`is_full(step) -> bool`)."""

    def __init__(self, is_full: Callable[[int], bool]):
        self.is_full = is_full

    def decide(self, step: int, probe=None, size=(), timestep=None) -> bool:
        return self.is_full(step)


_POLICIES: dict[str, Callable[[], RefreshPolicy]] = {}


def register_policy(name: str, factory: Callable[[], RefreshPolicy]) -> None:
    """Makes `refresh=name` mean `factory()` (a policy with its defaults)."""
    _POLICIES[name] = factory


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def resolve_policy(value: str | RefreshPolicy | None) -> RefreshPolicy | None:
    """`refresh=` as a policy: None, a registered name, or a policy object."""
    if value is None or isinstance(value, RefreshPolicy):
        return value
    if isinstance(value, str) and value in available_policies():
        return _POLICIES[value]()
    raise ValueError(f"refresh={value!r} is not a refresh policy: pass one of {available_policies()} or an object "
                     "with uses_probe, exportable and controller() (see deepcache_compile.policy)")
