"""Two graphs or three: what the head/deep/tail split costs per step against the full/shallow pair.

The three-graph split (needed by adaptive refresh, which decides after the head ran) hands the head's outputs
to the deep and tail graphs as graph inputs; compiled backends then materialize them where the pair fuses
through. Per backend, the pair and the three-graph form of the same branch are timed side by side, candidates
interleaved in each round, medians of the rounds:
- full step: `pair.full` vs head -> deep -> tail;
- shallow step: `pair.shallow` vs head -> tail.

    python bench/three_graphs.py                      # SD 1.5 architecture, 256 px, batch 2, branch 1
    python bench/three_graphs.py --backends eager inductor onnxruntime --repeats 7

Writes bench/results/three_graphs.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.presets import build_unet, example_call
from deepcache_compile.eval.report import write_report
from deepcache_compile.eval.sampling import interleaved, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--branch", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor", "onnxruntime"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per candidate per round")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    unet = build_unet(args.preset)
    latent = args.resolution // 8
    call = example_call(unet, batch=args.batch, height=latent, width=latent)
    rows = []
    for backend in args.backends:
        forms = {split: compile_deepcache(unet, branch=args.branch, backend=backend, split=split)
                 for split in ("pair", "three")}
        pairs = {split: dc.prepare(**call) for split, dc in forms.items()}
        inputs = forms["pair"].flatten((), call).tensors
        with torch.no_grad():
            cache = pairs["pair"].full(*inputs)[1]
            candidates = {}
            for split, pair in pairs.items():
                candidates[f"{split} full"] = _repeat(lambda pair=pair: pair.full(*inputs), args.calls)
                candidates[f"{split} shallow"] = _repeat(lambda pair=pair: pair.shallow(*inputs, cache), args.calls)
            times = interleaved(candidates, args.repeats, progress=True)
        ms = {name: 1e3 * median(t) / args.calls for name, t in times.items()}
        for step in ("full", "shallow"):
            rows.append({"backend": backend, "step": step, "pair_ms": ms[f"pair {step}"],
                         "three_ms": ms[f"three {step}"], "three_over_pair": ms[f"three {step}"] / ms[f"pair {step}"],
                         "links": len(pairs["three"].three.graphs.links)})
        print(rows[-2:])
    _write(rows, args)


def _repeat(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def _write(rows: list[dict], args) -> None:
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [f"{args.preset} at {args.resolution} px, batch {args.batch}, branch {args.branch}; {machine}; medians of "
             f"{args.repeats} interleaved rounds of {args.calls} calls", "",
             "| backend | step | pair ms | three graphs ms | three / pair |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['backend']} | {r['step']} | {r['pair_ms']:.1f} | {r['three_ms']:.1f} | {r['three_over_pair']:.3f} |"
              for r in rows]
    write_report(Path(args.out) / "three_graphs", {"options": vars(args), "machine": machine, "rows": rows}, lines)


if __name__ == "__main__":
    main()
