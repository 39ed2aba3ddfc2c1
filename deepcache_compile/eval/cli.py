"""Command line: `deepcache-compile demo|branches|bench|quality|analyze` (also `python -m deepcache_compile`)."""

from __future__ import annotations

import argparse
import logging

from .presets import PRESETS

__all__ = ["main"]


def _branches(args: argparse.Namespace) -> None:
    from ..api import list_branches
    from .presets import build_unet, example_call

    unet = build_unet(args.preset)
    latent = args.resolution // 8 if args.resolution else None
    rows = list_branches(unet, **example_call(unet, batch=args.batch, height=latent, width=latent))
    print(f"{'branch':>6} {'skip from':>32} {'consumed by':>24} {'cache shape':>22} {'full GMAC':>10} "
          f"{'shallow GMAC':>13} {'share':>7}")
    for r in rows:
        print(f"{r.index:>6} {r.producer_module:>32} {r.consumer_module:>24} {str(r.cache_shape):>22} "
              f"{r.full_macs / 1e9:>10.2f} {r.shallow_macs / 1e9:>13.2f} {r.mac_share:>7.1%}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoOptions, DigitsDemoOptions, run_demo, run_digits_demo

    if args.preset == "digits":
        run_digits_demo(DigitsDemoOptions(samples=args.samples, steps=args.steps or 50, branch=args.branch,
                                          interval=args.interval, repeats=args.repeats, out=args.out))
        return
    run_demo(DemoOptions(preset=args.preset, resolution=args.resolution, batch=args.batch,
                         backends=tuple(args.backends), steps=args.steps or 10, repeats=args.repeats,
                         min_run_time=args.min_run_time))


def _bench(args: argparse.Namespace) -> None:
    from .benchmark import BenchOptions, markdown_table, run_benchmark

    rows = run_benchmark(BenchOptions(
        preset=args.preset, resolution=args.resolution, batch=args.batch, steps=args.steps, branch=args.branch,
        intervals=tuple(args.interval), schedules=tuple(args.schedule),
        backends=tuple(args.backend) if args.backend else None, dtypes=tuple(args.dtype) if args.dtype else None,
        device=args.device, baselines=tuple(args.baseline), repeats=args.repeats, out=args.out,
        min_run_time=args.min_run_time, one_loop=args.one_loop,
    ))
    print(markdown_table(rows))
    print(f"written to {args.out}/")


def _quality(args: argparse.Namespace) -> None:
    if args.policies:
        _policies(args)
        return
    if args.transformer:
        _transformer(args)
        return
    from .quality import QualityOptions, evaluate_quality, quality_table, write_results

    opts = QualityOptions(steps=tuple(args.steps), intervals=tuple(args.interval), branches=tuple(args.branch),
                          schedules=tuple(args.schedule), samples=args.samples, seed=args.seed,
                          always_full_last=args.always_full_last, dtype=args.dtype, backend=args.backend,
                          out=args.out if args.dtype == "fp32" or args.out != QualityOptions.out
                          else f"{QualityOptions.out}_{args.dtype}")
    rows = evaluate_quality(opts)
    print(quality_table(rows))
    print(f"written to {write_results(rows, opts)}")


def _policies(args: argparse.Namespace) -> None:
    from .quality import QualityOptions
    from .refresh_study import RefreshStudyOptions, evaluate_refresh, refresh_table, write_refresh_results

    if len(args.branch) != 1:
        raise SystemExit("--policies compares policies at one branch: pass one --branch (e.g. --branch 1)")
    opts = RefreshStudyOptions(steps=tuple(args.steps), intervals=tuple(args.interval), branch=args.branch[0],
                               samples=args.samples, seed=args.seed,
                               out=args.out if args.out != QualityOptions.out else RefreshStudyOptions.out)
    rows = evaluate_refresh(opts)
    print(refresh_table(rows))
    print(f"written to {write_refresh_results(rows, opts)}")


def _transformer(args: argparse.Namespace) -> None:
    from .quality import QualityOptions
    from .transformer_study import (TransformerStudyOptions, evaluate_transformer_caches, transformer_table,
                                    write_transformer_results)

    if len(args.steps) != 1:
        raise SystemExit("--transformer runs one step count: pass one --steps (e.g. --steps 50)")
    intervals = tuple(args.interval) if args.interval != list(QualityOptions.intervals) else TransformerStudyOptions.intervals
    opts = TransformerStudyOptions(steps=args.steps[0], intervals=intervals, samples=args.samples, seed=args.seed,
                                   out=args.out if args.out != QualityOptions.out else TransformerStudyOptions.out)
    rows = evaluate_transformer_caches(opts)
    print(transformer_table(rows))
    print(f"written to {write_transformer_results(rows, opts)}")


def _analyze(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from .analyze import feature_similarity, write_analysis

    torch.manual_seed(args.seed)
    if args.preset == "digits":
        from .digits import load_digits_model

        unet, scheduler = load_digits_model()
        call = {"sample": torch.randn(args.batch, 1, 16, 16)}
    else:
        from .presets import build_unet, example_call

        unet, scheduler = build_unet(args.preset), None
        latent = args.resolution // 8 if args.resolution else None
        call = example_call(unet, batch=args.batch, height=latent, width=latent)
        call.pop("timestep", None)
    sim = feature_similarity(unet, call, args.steps, scheduler, threshold=args.threshold)
    branches = tuple(args.branch) if args.branch else tuple(sorted(sim.similarity))[:4]
    record = write_analysis(sim, Path(args.out), branches)
    print(f"{'branch':>6} {'shallow MACs':>13} {'adjacent sim':>13} {'steps > ' + str(args.threshold):>12}")
    for b in sorted(sim.similarity):
        adjacent = sim.similarity[b].diagonal(1).mean().item()
        print(f"{b:>6} {sim.mac_share[b]:>12.1%} {adjacent:>13.3f} {sim.share_above(b).mean().item():>12.1%}")
    print(f"\nsuggestion: {record['suggestion'].get('text', record['suggestion'].get('error'))}")
    if args.budget:
        print(f"\ncalibrated plans for {args.budget} full steps of {args.steps} (predicted drift = mean 1 - cosine "
              "similarity between each step's feature and the one it reuses):")
        for b in branches:
            print(f"  {sim.plan(b, args.budget)}")
    print(f"written: {args.out} and {Path(args.out).with_suffix('.json')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deepcache-compile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the compiler does")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import DigitsDemoOptions

    demo = sub.add_parser("demo", help="digits with and without DeepCache on the trained model (default), or "
                                       "exactness and latency on a built-in architecture (--preset sd15)")
    demo.add_argument("--preset", default="digits", choices=["digits", *sorted(PRESETS)])
    demo.add_argument("--samples", type=int, default=256, help="digits: how many digits to generate")
    demo.add_argument("--branch", type=int, default=DigitsDemoOptions.branch, help="digits: the DeepCache branch")
    demo.add_argument("--interval", type=int, default=DigitsDemoOptions.interval, help="digits: DeepCache's N")
    demo.add_argument("--out", default="demo_out", help="digits: where the image grids go")
    demo.add_argument("--resolution", type=int, default=256, help="architectures: image pixels (latent = /8)")
    demo.add_argument("--batch", type=int, default=1, help="architectures: U-Net batch")
    demo.add_argument("--steps", type=int, default=None, help="DDIM steps (digits: 50, architectures: 10)")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--min-run-time", type=float, default=2.0, help="seconds per per-graph measurement")
    demo.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    demo.set_defaults(func=_demo)

    branches = sub.add_parser("branches", help="list the skip branches with their shallow MAC share")
    branches.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    branches.add_argument("--resolution", type=int, default=None, help="image pixels (default: the config's)")
    branches.add_argument("--batch", type=int, default=1)
    branches.set_defaults(func=_branches)

    bench = sub.add_parser("bench", help="DDIM-loop latency: DeepCache vs eager, torch.compile and the reference")
    bench.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    bench.add_argument("--resolution", type=int, default=256, help="image size in pixels (latent = /8)")
    bench.add_argument("--batch", type=int, default=2, help="U-Net batch (CFG doubles the prompt batch)")
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--branch", type=int, default=1)
    bench.add_argument("--interval", type=int, nargs="+", default=[2, 3, 5, 10])
    bench.add_argument("--schedule", nargs="+", default=["uniform", "nonuniform"], choices=["uniform", "nonuniform"])
    bench.add_argument("--backend", nargs="+", default=None,
                       help="backends, optionally with options: inductor:freezing=False (default: every backend "
                            "that runs on the device)")
    bench.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16", "int8"],
                       help="default: fp32, plus bf16 and fp16 where oneDNN has kernels for them, and int8 "
                            "(the fp32 model quantized) where torchao is installed (CPU); fp32, fp16 and bf16 (CUDA)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--baseline", nargs="*", default=["unet-eager", "unet-compile", "reference-helper"],
                       choices=["unet-eager", "unet-compile", "reference-helper"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="out/bench", help="where the rows, table and plot go (git ignores out/)")
    bench.add_argument("--min-run-time", type=float, default=6.0, help="seconds per per-graph measurement")
    bench.add_argument("--one-loop", action="store_true",
                       help="time every dtype's candidates in one interleaved loop with one fp32 reference (the "
                            "dtypes compared side by side; holds every dtype's compiled copies at once)")
    bench.set_defaults(func=_bench)

    quality = sub.add_parser("quality", help="quality cost of DeepCache on the trained digits DDPM (Tables 2 and 4)")
    from .quality import QualityOptions as Q

    quality.add_argument("--steps", type=int, nargs="+", default=list(Q.steps))
    quality.add_argument("--interval", type=int, nargs="+", default=list(Q.intervals))
    quality.add_argument("--branch", type=int, nargs="+", default=list(Q.branches))
    quality.add_argument("--schedule", nargs="+", default=list(Q.schedules), choices=["uniform", "nonuniform"])
    quality.add_argument("--samples", type=int, default=Q.samples)
    quality.add_argument("--seed", type=int, default=Q.seed)
    quality.add_argument("--always-full-last", type=int, default=Q.always_full_last,
                         help="the last this-many steps are full steps")
    quality.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                         help="run the full model and DeepCache in this precision (int8: the fp32 model quantized), "
                              "scored against the fp32 full model (default out: out/quality_<dtype>)")
    quality.add_argument("--backend", default=Q.backend,
                         help="the DeepCache rows' backend, with options as for bench (inductor:attention='sdpa'); "
                              "the full-model rows stay eager")
    quality.add_argument("--out", default=Q.out)
    quality.add_argument("--policies", action="store_true",
                         help="compare refresh policies (uniform, non-uniform, calibrated, adaptive, each with and "
                              "without forecast) at the budgets of the given intervals, at one --branch; writes "
                              "out/refresh/")
    quality.add_argument("--transformer", action="store_true",
                         help="the digits DiT: our block caches against diffusers' FirstBlockCache and TaylorSeer "
                              "hooks at the budgets of the given intervals (default 2 3 5 8 12), transformer FLOPs "
                              "counted; one --steps; writes out/transformer/")
    quality.set_defaults(func=_quality)

    analyze = sub.add_parser("analyze", help="feature similarity across steps (paper Fig. 2), branch/interval hint")
    analyze.add_argument("--preset", default="digits", choices=["digits", *sorted(PRESETS)],
                         help="digits = the trained model; others are architectures with random weights")
    analyze.add_argument("--steps", type=int, default=100)
    analyze.add_argument("--batch", type=int, default=16)
    analyze.add_argument("--resolution", type=int, default=None, help="architectures: image pixels (latent = /8)")
    analyze.add_argument("--branch", type=int, nargs="*", default=None, help="branches to plot (default: 0..3)")
    analyze.add_argument("--threshold", type=float, default=0.95)
    analyze.add_argument("--budget", type=int, default=None,
                         help="also print the calibrated plan with this many full steps for each plotted branch")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--out", default="out/similarity_digits.png", help="the heatmap (a JSON beside it)")
    analyze.set_defaults(func=_analyze)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    args.func(args)
