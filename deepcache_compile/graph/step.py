"""Head/deep/tail graphs + a refresh rule -> one step module that decides full or cached on the device.

A probe policy on the three-graph split decides on the host: the head's probe drift is read (`float(...)`, one
device sync per step) and Python picks the next graph. `DeviceStep` makes the whole step one module instead:
the head runs, the drift and the decision are tensor arithmetic (`policy.DeviceRule`), `torch.cond` runs the
deep graph (full) or passes the kept cache on (cached), and the tail runs on what it chose. The policy's state
is tensors that go in and come out of the step, so the module holds none, and its graph has no `.item()` (no
`aten._local_scalar_dense`): it traces whole with `torch.export`, compiles with Inductor or AOTInductor as one
program, and a CUDA graph or an engine can run it without Python between steps.

Signature: `(*inputs, cache, reference, drift, run, mode) -> (sample, cache, reference, drift, run, full)`:
- `cache`: the kept residual/feature; `reference`: the probe the next drift is measured from;
- `drift`: float32 0-d, the accumulated drift (`accumulate`) or the last change; `run`: int64 0-d, cached steps
  in a row (start a generation with `run = max_skip`, which makes its first step full: `initial_state`);
- `mode`: int64 0-d: 0 decide, 1 force full, 2 force cached (calibration and checks);
- `full`: bool 0-d, what the step did (read it only when needed: reading it syncs).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..policy import NO_LIMIT, DeviceRule, StepState
from ..refresh import relative_l1
from .partition import ThreeGraphs
from .passes import PassOptions, apply_passes

__all__ = ["DeviceStep", "device_step"]


class DeviceStep(nn.Module):
    """One cached-generation step with the decision on the device (see the module docstring).

    Example:
        >>> step = DeviceStep(split_three(traced.gm, cut), DeviceRule(0.1, None, accumulate=False))
        >>> state = step.state.initial(batch, device)
        >>> sample, *state, full = step(*inputs, *state, torch.tensor(0))
    """

    def __init__(self, three: ThreeGraphs, rule: DeviceRule, n_inputs: int):
        super().__init__()
        self.head, self.deep, self.tail = three.head, three.deep, three.tail
        self.probe, self.n_inputs = three.probe, n_inputs
        self.threshold, self.accumulate = float(rule.threshold), rule.accumulate
        self.limit = NO_LIMIT if rule.max_skip is None else int(rule.max_skip)
        probe = three.head.graph.output_node().args[0][self.probe].meta["val"]
        cache = next(n for n in three.tail.graph.find_nodes(op="placeholder") if n.target == "cache").meta["val"]
        self.state = StepState(cache=tuple(cache.shape[1:]), cache_dtype=cache.dtype, probe=tuple(probe.shape[1:]),
                               probe_dtype=probe.dtype, limit=self.limit)

    def initial_state(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(cache, reference, drift, run)` that start a generation for these inputs (its first step is full)."""
        return self.state.initial(inputs[0].shape[0], inputs[0].device)

    def example(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step's whole input for these model inputs at a generation's start (mode 0, decide): what it is
        traced and compiled on."""
        return (*inputs, *self.initial_state(*inputs), torch.zeros((), dtype=torch.int64, device=inputs[0].device))

    def forward(self, *args: torch.Tensor):
        inputs, (cache, reference, drift, run, mode) = args[:self.n_inputs], args[self.n_inputs:]
        links = self.head(*inputs)
        probe = links[self.probe]
        change = relative_l1(probe, reference)
        if self.accumulate:
            drift = drift + change
            decided = (drift >= self.threshold) | (run >= self.limit)
        else:
            drift = change
            decided = (change > self.threshold) | (run >= self.limit)
        full = torch.where(mode == 0, decided, mode == 1)
        n, k = len(inputs), len(links)

        def unpack(ops):  # torch.cond passes the operands flat: (inputs, links, cache, reference, drift, probe, run)
            return (ops[:n], ops[n:n + k], *ops[n + k:])

        def full_step(*ops):
            step_inputs, step_links, _, _, step_drift, step_probe, step_run = unpack(ops)
            (kept,) = self.deep(*step_inputs, *step_links)
            return kept, step_probe.clone(), torch.zeros_like(step_drift), torch.zeros_like(step_run)

        def cached_step(*ops):
            _, _, kept, step_reference, step_drift, step_probe, step_run = unpack(ops)
            reference_next = step_probe if self.accumulate else step_reference
            return kept.clone(), reference_next.clone(), step_drift.clone(), step_run + 1

        operands = (*inputs, *links, cache, reference, drift, probe, run)
        cache, reference, drift, run = torch.cond(full, full_step, cached_step, operands)
        (sample,) = self.tail(*inputs, *links, cache)  # after the branch: the cache it chose
        return sample, cache, reference, drift, run, full


def device_step(three: ThreeGraphs, policy, passes: PassOptions, n_inputs: int) -> DeviceStep:
    """The step module of a probe policy (`policy.device_rule()`) over `three`, each graph after the graph passes
    (`graph.passes`, as compile and export apply them to every graph of a split)."""
    three = dataclasses.replace(three, **{part: apply_passes(getattr(three, part), part, passes)
                                          for part in ("head", "deep", "tail")})
    return DeviceStep(three, policy.device_rule(), n_inputs)
