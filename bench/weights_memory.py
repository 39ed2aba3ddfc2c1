"""Copies of the weights: resident memory of each backend against the U-Net alone, before and after
`dc.release_weights()`.

    python bench/weights_memory.py --preset sd15 --resolution 256 --batch 2

Each backend runs in a fresh process (so that one backend's freed memory does not flatter the next): build the
U-Net (resident set R0: the U-Net alone), compile the pair and run three DDIM steps (R1), release the PyTorch
copy of the weights where the backend's graphs hold their own (R2), run three more steps and check the output
still equals the one before the release. Reported: the weights' size W, R1 - R0 (what compiling added), R2 - R0,
and the issue's target R - R0 <= 0.15 W. Per-call time of the full graph is measured before and after the
release (torch.utils.benchmark medians). Writes bench/results/weights_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

GB = 1e9


def measure(preset: str, resolution: int, batch: int, spec: str, dtype: str) -> dict:
    import torch

    from deepcache_compile import compile_deepcache
    from deepcache_compile.eval.benchmark import parse_backend
    from deepcache_compile.eval.report import machine
    from deepcache_compile.eval.memory import resident
    from deepcache_compile.eval.presets import DTYPES, build_unet, example_call
    from deepcache_compile.eval.sampling import ddim_loop, median_ms

    unet = build_unet(preset, dtype=DTYPES[dtype])
    weights = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    call = example_call(unet, batch=batch, height=resolution // 8, width=resolution // 8)
    r0 = resident()
    backend, options = parse_backend(spec)
    dc = compile_deepcache(unet, branch=1, interval=5, backend=backend, backend_options=options)
    pair = dc.prepare(**call)
    inputs = pair.traced.example_inputs
    before = ddim_loop(dc, call, 3)
    r1 = resident()
    with torch.no_grad():
        full_ms = median_ms(lambda: pair.full(*inputs), 3.0)
    row = {"backend": spec, "dtype": dtype, "weights_gb": weights / GB, "unet_alone_gb": r0 / GB,
           "added_gb": (r1 - r0) / GB, "full_ms": full_ms, **machine()}
    try:
        row["released_gb"] = dc.release_weights() / GB
    except ValueError as err:
        row["release"] = str(err).split(":")[0]
        return row
    r2 = resident()
    after = ddim_loop(dc, call, 3)
    with torch.no_grad():
        row.update(added_after_release_gb=(r2 - r0) / GB, same_output=bool(torch.equal(before, after)),
                   full_ms_after_release=median_ms(lambda: pair.full(*inputs), 3.0))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--backends", nargs="+",
                        default=["eager", "inductor", "inductor:freezing=False", "aoti", "aoti:share_weights=True",
                                 "onnxruntime", "onnxruntime:session_options={'enable_cpu_mem_arena':False}"])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one backend
    parser.add_argument("--out", default="bench/results/weights_memory")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.preset, args.resolution, args.batch, args.one, args.dtype)))
        return
    rows = []
    for spec in args.backends:
        child = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--resolution", str(args.resolution),
                                "--batch", str(args.batch), "--dtype", args.dtype, "--one", spec],
                               capture_output=True, text=True)
        if child.returncode:
            rows.append({"backend": spec, "error": child.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"{args.preset} {args.resolution} px, batch {args.batch}, {args.dtype}: resident memory against the U-Net "
             f"alone (weights W = {rows[0].get('weights_gb', float('nan')):.2f} GB), one fresh process per backend", "",
             "| backend | added by compiling, GB | after release_weights(), GB | target <= 0.15 W | full step ms "
             "(before / after release) |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | failed: {r['error']} | | | |")
            continue
        final = r.get("added_after_release_gb", r["added_gb"])
        after = (f"{r['added_after_release_gb']:.2f} (output unchanged: {r['same_output']})"
                 if "added_after_release_gb" in r else f"not released: {r['release']}")
        times = f"{r['full_ms']:.0f}" + (f" / {r['full_ms_after_release']:.0f}" if "full_ms_after_release" in r else "")
        lines.append(f"| {r['backend']} | {r['added_gb']:.2f} | {after} | "
                     f"{'met' if final <= 0.15 * r['weights_gb'] else 'not met'} | {times} |")
    from deepcache_compile.eval.report import write_report

    write_report(args.out, rows, lines)


if __name__ == "__main__":
    main()
