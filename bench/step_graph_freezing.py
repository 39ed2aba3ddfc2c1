"""Why the device-decided step graph (`split="step"`) is slower than the host-decided three-graph split on a CPU:
per-call latency of a forced full and a forced cached step of each, with Inductor's freezing on (its default on
CPU) and off, interleaved in one loop.

PixArt-Sigma's transformer (published config, random weights; `--layers` blocks, 8 by default to keep the
compile short), 256 px, batch 1, first-block rule (threshold 0.3), Inductor.

    python bench/step_graph_freezing.py                   # bf16, ~2 minutes here
    python bench/step_graph_freezing.py --dtype fp32 --layers 28

Writes bench/results/step_graph_freezing_<dtype>.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from deepcache_compile import FirstBlockRefresh, compile_deepcache
from deepcache_compile.eval.benchmark import matmul_peak, precision_dtype
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.eval.sampling import busy_warning, interleaved, median
from transformer_wall import PIXART_SIGMA

OUT = Path(__file__).parent / "results"

CANDIDATES = {
    "three graphs, frozen": dict(split="three"),
    "step graph, frozen": dict(split="step"),
    "three graphs, not frozen": dict(split="three", backend_options={"freezing": False}),
    "step graph, not frozen": dict(split="step", backend_options={"freezing": False}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = precision_dtype(args.dtype)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**PIXART_SIGMA, "num_layers": args.layers}).eval().to(dtype)
    gen = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(1, 4, 32, 32, generator=gen).to(dtype),
                encoder_hidden_states=torch.randn(1, 300, 4096, generator=gen).to(dtype),
                timestep=torch.tensor([500.0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    runs, ready = {}, {}
    for name, options in CANDIDATES.items():
        start = time.perf_counter()
        dc = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.3), backend="inductor", **options)
        pair = dc.prepare(**call)
        inputs = dc.flatten((), call).tensors
        with torch.no_grad():
            cache = pair.full(*inputs)[1]
        ready[name] = time.perf_counter() - start
        print(f"{name}: compiled in {ready[name]:.0f} s", flush=True)
        runs[f"{name} | full"] = lambda p=pair, i=inputs: p.full(*i)
        runs[f"{name} | cached"] = lambda p=pair, i=inputs, c=cache: p.shallow(*i, c)
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up
        times = interleaved(runs, args.repeats, progress=True)
    peak = matmul_peak(dtype)
    rows = [{"candidate": name, "step": step, "median_ms": median(times[f"{name} | {step}"]) * 1e3,
             "ready_s": ready[name]} for name in CANDIDATES for step in ("full", "cached")]
    info = {"machine": machine(), "matmul_peak_gflops": peak / 1e9, "dtype": args.dtype, "layers": args.layers,
            "repeats": args.repeats, "busy": busy_warning(times), "rows": rows}
    lines = [f"PixArt-Sigma transformer ({args.layers} blocks, random weights), 256 px, batch 1, {args.dtype}, "
             f"Inductor; {info['machine']['cpu']}, {info['machine']['threads']} threads, {args.dtype} matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s; medians of {args.repeats} interleaved rounds"
             + (f". WARNING: {info['busy']}" if info["busy"] else ""), "",
             "| candidate | step | median ms |", "| --- | --- | --- |"]
    lines += [f"| {r['candidate']} | {r['step']} | {r['median_ms']:.1f} |" for r in rows]
    write_report(OUT / f"step_graph_freezing_{args.dtype}", info, lines)


if __name__ == "__main__":
    main()
