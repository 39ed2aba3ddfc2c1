"""Command line: `deepcache-compile demo` and `deepcache-compile branches` (also `python -m deepcache_compile`)."""

from __future__ import annotations

import argparse
import logging

from .presets import PRESETS

__all__ = ["main"]


def _branches(args: argparse.Namespace) -> None:
    from .api import list_branches
    from .presets import build_unet, example_call

    unet = build_unet(args.preset)
    latent = args.resolution // 8 if args.resolution else None
    rows = list_branches(unet, **example_call(unet, batch=args.batch, height=latent, width=latent))
    print(f"{'branch':>6} {'skip from':>32} {'consumed by':>24} {'cache shape':>22} {'full GMAC':>10} "
          f"{'shallow GMAC':>13} {'share':>7}")
    for r in rows:
        print(f"{r.index:>6} {r.skip_from:>32} {r.consumed_by:>24} {str(r.cache_shape):>22} "
              f"{r.full_macs / 1e9:>10.2f} {r.shallow_macs / 1e9:>13.2f} {r.mac_share:>7.1%}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(preset=args.preset, resolution=args.resolution, batch=args.batch,
                         backends=tuple(args.backends), steps=args.steps, repeats=args.repeats,
                         min_run_time=args.min_run_time))


def _bench(args: argparse.Namespace) -> None:
    from .benchmark import BenchOptions, markdown_table, run_benchmark

    rows = run_benchmark(BenchOptions(
        preset=args.preset, resolution=args.resolution, batch=args.batch, steps=args.steps, branch=args.branch,
        intervals=tuple(args.interval), schedules=tuple(args.schedule), backends=tuple(args.backend),
        baselines=tuple(args.baseline), repeats=args.repeats, out=args.out, min_run_time=args.min_run_time,
    ))
    print(markdown_table(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deepcache-compile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the compiler does")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="exactness check and full vs DeepCache latency on a built-in U-Net")
    demo.add_argument("--preset", default="sd15", choices=sorted(PRESETS))
    demo.add_argument("--resolution", type=int, default=256, help="image size in pixels (latent = /8)")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--steps", type=int, default=10)
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
    bench.add_argument("--backend", nargs="+", default=["eager", "inductor"])
    bench.add_argument("--baseline", nargs="*", default=["unet-eager", "unet-compile", "reference-helper"],
                       choices=["unet-eager", "unet-compile", "reference-helper"])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", default="bench/results")
    bench.add_argument("--min-run-time", type=float, default=6.0, help="seconds per per-graph measurement")
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    args.func(args)
