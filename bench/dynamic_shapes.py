"""Static vs dynamic compiled pairs on the SD 1.5 architecture (or PixArt-Sigma's transformer) at several
resolutions: compile time and per-call latency.

    python bench/dynamic_shapes.py                         # inductor; about 20 minutes here
    python bench/dynamic_shapes.py --backends inductor aoti --sizes 256 384 512 --batch 2
    python bench/dynamic_shapes.py --model pixart-sigma --sizes 256 384   # 600 M transformer, 256-576 tokens

Static: `compile_deepcache(unet, ...)` compiles one pair per resolution (one `dc.prepare` each, timed).
Dynamic: `compile_deepcache(unet, ..., dynamic=dict(batch=(2, 4), height=..., width=...))` compiles one pair,
timed once, that serves all of them (batch 2 is the CFG batch; a range from 1 would add Inductor's batch-1
specialization to its compile time). Each with its default options: Inductor's freezing is on for static
pairs and off for dynamic ones (freezing with symbolic shapes fails in torch 2.13). Per-call latency: the full graph and the shallow graph at each size,
static and dynamic interleaved, median of `--repeats` rounds. `verify=False` for both, so compile times are
the compilers' alone. Writes bench/results/dynamic_shapes.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.calls import example_call
from deepcache_compile.eval.presets import build_unet
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.eval.sampling import interleaved, median, timed

OUT = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["inductor"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 384, 512], help="image pixels (latents /8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="sd15", choices=["sd15", "pixart-sigma"])
    args = parser.parse_args()
    latents = [s // 8 for s in args.sizes]
    if args.model == "sd15":
        unet = build_unet("sd15")
        calls = {s: example_call(unet, batch=args.batch, height=h, width=h) for s, h in zip(args.sizes, latents)}
    else:
        unet, calls = _pixart(args.sizes, args.batch)
    branch = 1 if args.model == "sd15" else 0  # a transformer: the first-block layout
    ranges = dict(batch=(2, 4), height=(min(latents), max(latents)), width=(min(latents), max(latents)))
    rows = []
    for backend in args.backends:
        static = compile_deepcache(unet, branch=branch, backend=backend, verify=False, max_signatures=len(args.sizes))
        dynamic = compile_deepcache(unet, branch=branch, backend=backend, verify=False, dynamic=ranges)
        compile_s = {"static": [], "dynamic": []}
        for size in args.sizes:
            compile_s["static"].append(timed(lambda: static.prepare(**calls[size]))[1])
            print(f"{backend}: static pair for {size} px compiled in {compile_s['static'][-1]:.0f} s", flush=True)
        compile_s["dynamic"].append(timed(lambda: dynamic.prepare(**calls[args.sizes[0]]))[1])
        print(f"{backend}: compile static {compile_s['static']} s, dynamic {compile_s['dynamic']} s", flush=True)
        candidates = {}
        for size in args.sizes:
            for kind, dc in (("static", static), ("dynamic", dynamic)):
                pair = dc.prepare(**calls[size])
                inputs = dc.flatten((), calls[size]).tensors
                with torch.no_grad():
                    cache = pair.full(*inputs)[1]
                candidates[size, kind, "full"] = lambda p=pair, i=inputs: p.full(*i)
                candidates[size, kind, "shallow"] = lambda p=pair, i=inputs, c=cache: p.shallow(*i, c)
        with torch.no_grad():
            for fn in candidates.values():
                fn()  # warm-up
            times = interleaved({str(k): fn for k, fn in candidates.items()}, args.repeats, progress=True)
        for size in args.sizes:
            for part in ("full", "shallow"):
                s, d = median(times[str((size, "static", part))]), median(times[str((size, "dynamic", part))])
                rows.append(dict(backend=backend, size=size, part=part, static_ms=s * 1e3, dynamic_ms=d * 1e3,
                                 dynamic_vs_static=d / s))
        rows.append(dict(backend=backend, compile_static_s=compile_s["static"], compile_dynamic_s=compile_s["dynamic"],
                         pairs_static=len(static.pairs), pairs_dynamic=len(dynamic.pairs)))
    settings = {"model": args.model, "batch": args.batch, "repeats": args.repeats}
    lines = ["| backend | size (px) | graph | static ms | dynamic ms | dynamic / static |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['size']} | {r['part']} | {r['static_ms']:.0f} | {r['dynamic_ms']:.0f} | "
              f"{r['dynamic_vs_static']:.2f} |" for r in rows if "size" in r]
    lines += ["", "| backend | compile static (s, per size) | total | compile dynamic (s) | pairs static / dynamic |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {', '.join(f'{x:.0f}' for x in r['compile_static_s'])} | "
              f"{sum(r['compile_static_s']):.0f} | {r['compile_dynamic_s'][0]:.0f} | "
              f"{r['pairs_static']} / {r['pairs_dynamic']} |" for r in rows if "compile_static_s" in r]
    stem = "dynamic_shapes" if args.model == "sd15" else f"dynamic_shapes_{args.model}"
    write_report(OUT / stem, {"machine": machine(), **settings, "rows": rows}, lines)


def _pixart(sizes: list[int], batch: int):
    """PixArt-Sigma's transformer (published config, random weights) and a pipeline-like call per size: 300 T5
    tokens, the timestep per row."""
    from diffusers import PixArtTransformer2DModel
    from transformer_wall import PIXART_SIGMA

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**PIXART_SIGMA).eval()
    gen = torch.Generator().manual_seed(0)
    calls = {s: dict(hidden_states=torch.randn(batch, 4, s // 8, s // 8, generator=gen),
                     encoder_hidden_states=torch.randn(batch, 300, 4096, generator=gen),
                     timestep=torch.full((batch,), 500.0), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
             for s in sizes}
    return model, calls


if __name__ == "__main__":
    main()
