"""Where the time of one full step goes, per backend: Inductor against ONNX Runtime on the same graph.

    python bench/profile_backends.py --preset sd15 --resolution 256 --batch 2
    python bench/profile_backends.py --backends inductor --dtype fp32 bf16 --out bench/results/profile_bf16
    python bench/profile_backends.py --backends inductor --dtype fp32 bf16 --graph shallow \
        --out bench/results/profile_bf16_shallow
    python bench/profile_backends.py --backends inductor --dtype fp32 bf16 --top 12 --out bench/results/profile_top
    python bench/profile_backends.py --backends inductor --dtype bf16 int8 --out bench/results/profile_int8

Compiles one DeepCache pair (branch 1) with each backend and profiles `--calls` calls of its full graph (or
`--graph shallow`): Inductor under `torch.profiler` (its generated C++ kernels named through
`cpp.enable_kernel_profile`), ONNX Runtime with its own profiler (`SessionOptions.enable_profiling`, one event
per graph node). Both are summed into the same categories (convolution, matmul, attention, group norm,
elementwise and other) and written to `--out`.{json,md} (default bench/results/profile_backends), with the
machine. A fused kernel counts in the category of the first op its name matches, except that Inductor's own
loops are never "convolution" or "matmul" (those are extern oneDNN/MKL calls; a loop named `addmm_gelu_...` is
a bias add and a GELU): "group norm" holds group and layer norms and what Inductor fused into them (the
feed-forward's GELU, fused into the next layer norm). `--top N` lists each category's N slowest kernels.
int8 is the fp32 U-Net quantized as `deepcache-compile bench` quantizes it (`precision.Int8`, calibrated on one
10-step DDIM generation of the profiled call, N=5): loops whose names have quantize/dequantize (with what Inductor
fused into them) are "quantize", its oneDNN int8 convolutions and linears "convolution" and "matmul" (`qconv`,
`qlinear`).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.presets import DTYPES, build_unet, example_call
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.precision import Int8, record_calls

# A kernel or node name -> a category, first match wins (Inductor names fused kernels after the ops they fuse).
_CATEGORIES = [
    ("attention", r"attention|sdpa|softmax|flash"),
    ("convolution", r"conv"),
    ("matmul", r"gemm|matmul|\bmm\b|bmm|addmm|linear|mkl"),
    ("quantize", r"quantize|dequant"),
    ("group norm", r"group_norm|groupnorm|instancenorm|layernorm|layer_norm|native_layer_norm|var_mean|reduce"),
    ("elementwise", r"cpp_fused|add|mul|silu|gelu|sigmoid|div|sub|cat|erf|tanh|pow|sqrt|cast|where|expand|"
                    r"reshape|transpose|permute|clone|copy|unsqueeze|slice|view"),
]


# Inductor's generated C++ loops (`cpp_fused_*`) are pointwise ops and reductions: the convolutions and GEMMs
# are extern calls of their own (oneDNN, MKL), even where a loop's name lists `addmm` (a fused bias add).
_EXTERN_ONLY = ("convolution", "matmul")


def category(name: str) -> str:
    name = name.lower()
    generated = "cpp_fused" in name
    return next((c for c, pattern in _CATEGORIES if not (generated and c in _EXTERN_ONLY) and re.search(pattern, name)),
                "other")


def profile_inductor(graph, inputs, calls: int) -> dict[str, float]:
    """Milliseconds per call by event name: every profiled event's self time (wrappers' own time is "other")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        for _ in range(calls):
            graph(*inputs)
    totals = defaultdict(float)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / calls
    return dict(totals)


def profile_onnxruntime(graph, inputs, calls: int) -> dict[str, float]:
    """Milliseconds per call by node: the node events of the last `calls` runs of the graph's session (compiled
    with profiling on; earlier runs are the verification and the warm-up)."""
    with torch.no_grad():
        for _ in range(calls):
            graph(*inputs)
    events = json.loads(Path(graph.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-calls:]
    start = runs[0]["ts"]
    totals = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / calls
    return dict(totals)


def _slowest(totals: dict[str, float], n: int) -> dict[str, list[tuple[str, float]]]:
    """Each category's `n` slowest kernels (or nodes), with their milliseconds per call."""
    out = defaultdict(list)
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        if len(out[category(name)]) < n:
            out[category(name)].append((name, round(ms, 3)))
    return dict(out)


def _by_category(totals: dict[str, float]) -> dict[str, float]:
    out = defaultdict(float)
    for name, ms in totals.items():
        out[category(name)] += ms
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=[*sorted(DTYPES), "int8"],
                        help="each backend at each dtype (fp32 bf16: where bf16 gains and where it does not)")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--graph", nargs="+", default=["full"], choices=["full", "shallow"],
                        help="which of the pair's graphs (both: one table each, from the same compiled pairs)")
    parser.add_argument("--backends", nargs="+", default=["inductor", "onnxruntime"],
                        choices=["inductor", "onnxruntime"], help="onnxruntime has no bf16 convolution on CPU")
    parser.add_argument("--top", type=int, default=0, help="also list each category's N slowest kernels (or nodes)")
    parser.add_argument("--out", default="bench/results/profile_backends")
    args = parser.parse_args()

    torch._inductor.config.cpp.enable_kernel_profile = True
    results, top = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        profiling = {"session_options": {"enable_profiling": True, "profile_file_prefix": f"{tmp}/ort"}}
        for dtype in args.dtype:
            unet = build_unet(args.preset, dtype=DTYPES.get(dtype, torch.float32))
            call = example_call(unet, batch=args.batch, height=args.resolution // 8, width=args.resolution // 8)
            int8 = Int8(record_calls(unet, lambda: ddim_loop(unet, call, 10))) if dtype == "int8" else None
            for backend in args.backends:
                options = profiling if backend == "onnxruntime" else {}
                pair = compile_deepcache(unet, branch=1, backend=backend, backend_options=options, quantize=int8,
                                         interval=5 if int8 else None).prepare(**call)
                for part in args.graph:
                    graph, inputs = getattr(pair, part), pair.traced.example_inputs
                    with torch.no_grad():
                        if part == "shallow":
                            inputs = (*inputs, pair.full(*inputs)[1])  # the cache of a full step
                        graph(*inputs)  # warm-up
                    name = f"{backend} {dtype}" + (f" {part}" if len(args.graph) > 1 else "")
                    kernels = (profile_inductor(graph, inputs, args.calls) if backend == "inductor"
                               else profile_onnxruntime(graph, inputs, args.calls))
                    results[name] = _by_category(kernels)
                    top[name] = _slowest(kernels, args.top)
                del pair
    names = list(results)
    categories = sorted({c for r in results.values() for c in r}, key=lambda c: -results[names[0]].get(c, 0))
    ratio = f" | {names[0]} / {names[1]}" if len(names) == 2 else ""
    lines = [f"{args.preset} {args.resolution} px, batch {args.batch}, {' and '.join(args.graph)} step (branch 1); "
             f"ms per call, "
             f"{args.calls} profiled calls; {machine()['cpu']}, {torch.get_num_threads()} threads", "",
             "| category | " + " | ".join(f"{n} ms" for n in names) + ratio + " |",
             "| --- " * (len(names) + 1 + bool(ratio)) + "|"]
    for c in [*categories, "total"]:
        ms = [sum(r.values()) if c == "total" else r.get(c, 0.0) for r in results.values()]
        cells = " | ".join(f"{m:.1f}" for m in ms)
        cells += (f" | {ms[0] / ms[1]:.2f}" if ms[1] else " | ") if ratio else ""
        lines.append(f"| {c} | {cells} |")
    for name, slowest in top.items() if args.top else ():
        lines += ["", f"{name}: each category's {args.top} slowest kernels", "", "| category | kernel | ms |",
                  "| --- | --- | --- |"]
        lines += [f"| {c} | {k} | {ms:.2f} |" for c in categories if c in slowest for k, ms in slowest[c]]
    write_report(args.out, {"args": vars(args), "ms": results, "top": top, **machine()}, lines)


if __name__ == "__main__":
    main()
