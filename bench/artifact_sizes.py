"""Sizes of the full and shallow artifacts for a preset at a few branches (the weights each graph holds,
and, with --export, the real .pt2 files written by dc.export).

    python bench/artifact_sizes.py --preset sd15 --branches 0 1 2 --export pt2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.presets import build_unet, example_call


def _weight_bytes(gm) -> int:
    tensors = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--export", choices=["pt2", "onnx"], default=None)
    args = parser.parse_args()
    unet = build_unet(args.preset)
    call = example_call(unet, batch=2, height=32, width=32)
    print(f"{'branch':>6} {'full weights MB':>16} {'shallow weights MB':>19} {'full file MB':>13} {'shallow file MB':>16}")
    for branch in args.branches:
        dc = compile_deepcache(unet, branch=branch)
        pair = dc.prepare(**call)
        full_mb, shallow_mb = _weight_bytes(pair.split.full) / 1e6, _weight_bytes(pair.split.shallow) / 1e6
        files = ("", "")
        if args.export:
            with tempfile.TemporaryDirectory() as tmp:
                dc.export(tmp, format=args.export)
                sizes = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
                files = tuple(f"{sum(v for k, v in sizes.items() if k.startswith(part)) / 1e6:.1f}"
                              for part in ("full", "shallow"))
        print(f"{branch:>6} {full_mb:>16.1f} {shallow_mb:>19.1f} {files[0]:>13} {files[1]:>16}", flush=True)


if __name__ == "__main__":
    main()
