"""Which head output should the adaptive refresh watch? The one whose step-to-step change tracks the cached
feature's best.

On the shipped digits DDPM, a full-model DDIM run (64 samples, seed 0) goes through the head/deep/tail graphs of
each branch; at every step the relative L1 change of each head output (`links`: skips, time embeddings) and of
the model input is compared with the relative L1 change of the cached feature: Pearson correlation (the
adaptive rule sums the changes, so a linear relation is what it needs) and Spearman's rank correlation.

    python bench/probe_choice.py          # writes bench/results/probe_choice.{json,md}
"""

from __future__ import annotations


import numpy as np
import torch
from diffusers import DDIMScheduler
from scipy.stats import pearsonr, spearmanr

from deepcache_compile.calls import CallFlattener
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.report import write_report
from deepcache_compile.graph.branches import find_branches
from deepcache_compile.graph.partition import split_three
from deepcache_compile.graph.trace import trace_unet
from deepcache_compile.refresh import relative_l1


def run(steps: int, branch: int, unet, scheduler, noise, traced, flatten) -> list[dict]:
    three = split_three(traced.gm, find_branches(traced.gm)[branch])
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    x, records = noise, []
    with torch.no_grad():
        for t in sched.timesteps:
            inputs = flatten((x, t), {}).tensors
            links = three.head(*inputs)
            (cache,) = three.deep(*inputs, *links)
            records.append((x, links, cache))
            x = sched.step(three.tail(*inputs, *links, cache)[0], t, x).prev_sample
    target = np.array([relative_l1(records[i][2], records[i - 1][2]).item() for i in range(1, steps)])
    candidates = {"model input x_t": [r[0] for r in records]}
    for j, name in enumerate(three.links):
        label = f"{name} {tuple(records[0][1][j].shape[1:])}" + (" (deepest skip)" if j == three.probe else "")
        candidates[label] = [r[1][j] for r in records]
    rows = []
    for label, values in candidates.items():
        change = np.array([relative_l1(values[i], values[i - 1]).item() for i in range(1, steps)])
        if change.std() > 0:
            rows.append({"steps": steps, "branch": branch, "candidate": label, "pearson": pearsonr(change, target)[0],
                         "spearman": spearmanr(change, target)[0]})
    return sorted(rows, key=lambda r: -r["pearson"])


def main() -> None:
    torch.manual_seed(0)
    unet, scheduler = load_digits_model()
    noise = torch.randn(64, 1, 16, 16)
    flatten = CallFlattener(unet)
    traced = trace_unet(unet, flatten((noise, torch.tensor(999)), {}))
    rows = [r for steps in (50, 100) for branch in (0, 1, 2)
            for r in run(steps, branch, unet, scheduler, noise, traced, flatten)]
    lines = ["| DDIM steps | branch | head output | Pearson r | Spearman rho |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['steps']} | {r['branch']} | {r['candidate']} | {r['pearson']:.3f} | {r['spearman']:.3f} |"
              for r in rows]
    write_report("bench/results/probe_choice", rows, lines)


if __name__ == "__main__":
    main()
