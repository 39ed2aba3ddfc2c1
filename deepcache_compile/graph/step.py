"""Head/deep/tail graphs + a refresh rule -> one step module that decides full or cached on the device.

A probe policy on the three-graph split decides on the host: the head's probe drift is read (`float(...)`, one
device sync per step) and Python picks the next graph. `DeviceStep` makes the whole step one module instead:
the head runs, the drift and the decision are tensor arithmetic (`policy.DeviceRule`), and `torch.cond` runs the
deep and tail graphs (full) or the tail alone on the kept cache (cached). The policy's state is tensors that go
in and come out of the step, so the module holds none, and its graph has no `.item()` (no
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

import torch
from torch import nn

from ..policy import DeviceRule
from ..refresh import relative_l1
from .partition import ThreeGraphs

__all__ = ["DeviceStep", "NO_LIMIT"]

NO_LIMIT = 2 ** 62  # max_skip=None: the run counter never reaches it


class DeviceStep(nn.Module):
    """One cached-generation step with the decision on the device (see the module docstring).

    Example:
        >>> step = DeviceStep(split_three(traced.gm, cut), DeviceRule(0.1, None, accumulate=False))
        >>> state = step.initial_state(*inputs)
        >>> sample, *state, full = step(*inputs, *state, torch.tensor(0))
    """

    def __init__(self, three: ThreeGraphs, rule: DeviceRule, n_inputs: int):
        super().__init__()
        self.head, self.deep, self.tail = three.head, three.deep, three.tail
        self.probe, self.n_inputs = three.probe, n_inputs
        self.threshold, self.accumulate = float(rule.threshold), rule.accumulate
        self.limit = NO_LIMIT if rule.max_skip is None else int(rule.max_skip)
        links = [n for n in three.head.graph.output_node().args[0]]
        self.probe_shape = tuple(links[self.probe].meta["val"].shape)
        cache = next(n for n in three.tail.graph.find_nodes(op="placeholder") if n.target == "cache")
        self.cache_shape, self.cache_dtype = tuple(cache.meta["val"].shape), cache.meta["val"].dtype
        self.probe_dtype = links[self.probe].meta["val"].dtype

    def initial_state(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(cache, reference, drift, run)` that start a generation (its first step is full)."""
        device = inputs[0].device
        return (torch.zeros(self.cache_shape, dtype=self.cache_dtype, device=device),
                torch.zeros(self.probe_shape, dtype=self.probe_dtype, device=device),
                torch.zeros((), dtype=torch.float32, device=device),
                torch.full((), self.limit, dtype=torch.int64, device=device))

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

        def full_step(*ops):
            step_inputs, step_links = ops[:n], ops[n:n + k]
            (kept,) = self.deep(*step_inputs, *step_links)
            (sample,) = self.tail(*step_inputs, *step_links, kept)
            new_probe, new_run = ops[-2], ops[-1]
            return sample, kept, new_probe.clone(), torch.zeros_like(ops[-3]), torch.zeros_like(new_run)

        def cached_step(*ops):
            step_inputs, step_links, kept = ops[:n], ops[n:n + k], ops[n + k]
            (sample,) = self.tail(*step_inputs, *step_links, kept)
            reference_next = ops[-2] if self.accumulate else ops[n + k + 1]
            return sample, kept.clone(), reference_next.clone(), ops[-3].clone(), ops[-1] + 1

        operands = (*inputs, *links, cache, reference, drift, probe, run)
        sample, cache, reference, drift, run = torch.cond(full, full_step, cached_step, operands)
        return sample, cache, reference, drift, run, full
