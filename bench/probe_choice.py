"""Which head output should the adaptive refresh watch? The one whose step-to-step change tracks the cached
feature's best.

On the shipped digits DDPM, a full-model DDIM run (64 samples, seed 0) goes through the head/deep/tail graphs of
each branch; at every step the relative L1 change of each head output (`links`: skips, time embeddings) and of
the model input is compared with the relative L1 change of the cached feature: Pearson correlation (the
adaptive rule sums the changes, so a linear relation is what it needs) and Spearman's rank correlation.

    python bench/probe_choice.py          # writes bench/results/probe_choice.{json,md}
    python bench/probe_choice.py --dit    # the digits DiT: bench/results/probe_choice_dit.{json,md}

On the digits DiT (cuts 0-2, class labels 0..9 in turn) the candidates are the head's outputs (among them the
leading blocks' residual, first-block caching's probe, and block 0's output) and block 0's modulated input (the
output of its `norm1`, TeaCache's signal), against the change of the cached residual.
"""

from __future__ import annotations


import argparse

import numpy as np
import torch
from diffusers import DDIMScheduler
from scipy.stats import pearsonr, spearmanr

from deepcache_compile.calls import CallFlattener
from deepcache_compile.eval.digits import digit_labels, load_digits_dit, load_digits_model
from deepcache_compile.graph.cuts import find_cuts
from deepcache_compile.eval.report import write_report
from deepcache_compile.graph.partition import split_three
from deepcache_compile.graph.trace import trace_unet
from deepcache_compile.refresh import relative_l1


def run(steps: int, branch: int, unet, scheduler, noise, traced, flatten, extra: dict | None = None,
        watch=None) -> list[dict]:
    """`extra`: further keyword inputs of each call (class labels); `watch`: (label, module) whose output (its
    first element) is recorded from an eager run of the model beside the graphs."""
    cuts = find_cuts(traced.gm)
    three = split_three(traced.gm, cuts[branch])
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    x, records, watched = noise, [], []
    hook = None if watch is None else watch[1].register_forward_hook(
        lambda module, args, out: watched.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for t in sched.timesteps:
            t_in = t if extra is None else t.expand(len(x))
            inputs = flatten((x, t_in), extra or {}).tensors
            links = three.head(*inputs)
            (cache,) = three.deep(*inputs, *links)
            records.append((x, links, cache))
            if watch is not None:
                unet(x, t_in, **extra)
            x = sched.step(three.tail(*inputs, *links, cache)[0], t, x).prev_sample
    if hook is not None:
        hook.remove()
    target = np.array([relative_l1(records[i][2], records[i - 1][2]).item() for i in range(1, steps)])
    candidates = {"model input x_t": [r[0] for r in records]}
    probe_name = "deepest skip" if cuts[0].kind == "feature" else "leading blocks' residual"
    for j, name in enumerate(three.links):
        label = f"{name} {tuple(records[0][1][j].shape[1:])}" + (f" ({probe_name})" if j == three.probe else "")
        candidates[label] = [r[1][j] for r in records]
    if watch is not None:
        candidates[watch[0]] = watched
    rows = []
    for label, values in candidates.items():
        change = np.array([relative_l1(values[i], values[i - 1]).item() for i in range(1, steps)])
        if change.std() > 0:
            rows.append({"steps": steps, "branch": branch, "candidate": label, "pearson": pearsonr(change, target)[0],
                         "spearman": spearmanr(change, target)[0]})
    return sorted(rows, key=lambda r: -r["pearson"])


def main_dit() -> None:
    torch.manual_seed(0)
    model, scheduler = load_digits_dit()
    noise, labels = torch.randn(64, 1, 16, 16), digit_labels(64)
    flatten = CallFlattener(model)
    traced = trace_unet(model, flatten((noise, torch.full((64,), 999)), {"class_labels": labels}))
    watch = ("block 0's modulated input (norm1)", model.transformer_blocks[0].norm1)
    rows = [r for steps in (50, 100) for branch in (0, 1, 2)
            for r in run(steps, branch, model, scheduler, noise, traced, flatten, {"class_labels": labels}, watch)]
    lines = ["| DDIM steps | cut | head output | Pearson r | Spearman rho |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['steps']} | {r['branch']} | {r['candidate']} | {r['pearson']:.3f} | {r['spearman']:.3f} |"
              for r in rows]
    write_report("bench/results/probe_choice_dit", rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit", action="store_true", help="the digits DiT instead of the digits DDPM")
    if parser.parse_args().dit:
        main_dit()
        return
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
