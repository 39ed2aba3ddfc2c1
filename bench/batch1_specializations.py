"""How many graphs a dynamic Inductor pair compiles over its ranges: the digits model, batch 1..4 x 8..24 px.

Every batch-1 size (25) and the corners at batch 2-4, each a 4-step DDIM loop, compared with the dynamic eager
pair; counts dynamo's unique graphs (full and shallow together) after each shape. See the README ("Dynamic
shapes") for why batch 1 specializes: ATen's size-dependent convolution-backend choice.

    python bench/batch1_specializations.py     # 2-6 minutes here (Inductor's cache)

Writes bench/results/batch1_specializations.{json,md}.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.eval.soak import DIGITS_RANGES, SIZES

OUT = Path(__file__).parent / "results"


def main() -> None:
    unet, scheduler = load_digits_model()
    start = time.perf_counter()
    compiled = compile_deepcache(unet, branch=1, backend="inductor", dynamic=DIGITS_RANGES)
    eager = compile_deepcache(unet, branch=1, backend="eager", dynamic=DIGITS_RANGES)
    lo, hi = SIZES[0], SIZES[-1]
    shapes = [(1, h, w) for h in SIZES for w in SIZES] + [(b, h, w) for b in range(2, DIGITS_RANGES["batch"][1] + 1)
                                                            for h in (lo, hi) for w in (lo, hi)]
    rows = []
    for batch, height, width in shapes:
        noise = torch.randn(batch, 1, height, width, generator=torch.Generator().manual_seed(len(rows)))
        out, ref = (ddim_loop(dc, {"sample": noise}, 4, scheduler) for dc in (compiled, eager))
        rows.append(dict(batch=batch, height=height, width=width, graphs=counters["stats"]["unique_graphs"],
                         error=float((out - ref).abs().max() / ref.abs().max()),
                         seconds=time.perf_counter() - start))
    lines = [f"{len(shapes)} shapes: {rows[-1]['graphs']} graphs in all (full + shallow, the 4 compiled ahead of time "
             f"included), largest relative error vs eager {max(r['error'] for r in rows):.2g}, "
             f"{rows[-1]['seconds']:.0f} s", "", "| batch | height | width | graphs so far |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['height']} | {r['width']} | {r['graphs']} |" for r in rows]
    write_report(OUT / "batch1_specializations", {"machine": machine(), "rows": rows}, lines)


if __name__ == "__main__":
    main()
