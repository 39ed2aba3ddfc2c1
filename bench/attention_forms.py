"""Attention on CPU: fused SDPA against the decomposed form ONNX Runtime runs (two matmuls and a softmax), both
compiled by torch.compile, and in bf16 the project's kernel (kernels/attention.cpp, where the CPU has
AVX512-BF16), side by side on the attention shapes of SD 1.5 at 256 px, batch 2.

    python bench/attention_forms.py     # writes bench/results/attention_forms.{json,md}

Shapes (batch 2, 8 heads): self-attention at 1,024 / 256 / 64 tokens (head dim 40 / 80 / 160) and
cross-attention of 1,024 tokens to 77 text tokens (`--shapes 4096,4096,40 4096,77,40` adds SD 1.5's at 512 px).
torch.utils.benchmark medians on all of the process's threads, the forms interleaved: `--rounds` rounds, each
timing every form in turn, the median of the rounds' medians. `--dtype fp32 bf16` adds the bf16 rows.
"""

from __future__ import annotations

import argparse
from statistics import median

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from deepcache_compile.eval.presets import DTYPES
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.kernels import native_attention_missing

SHAPES = ((1024, 1024, 40), (1024, 77, 40), (256, 256, 80), (64, 64, 160))


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def decomposed(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, shape)) for shape in SHAPES],
                        help="TOKENS,KEYS,HEAD_DIM per shape (batch 2, 8 heads)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/attention_forms")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split(",")) for shape in args.shapes]
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape, dtype and form
    rows = []
    for dtype in args.dtype:
        for tokens, keys, dim in shapes:
            q, k, v = (torch.randn(2, 8, n, dim, dtype=DTYPES[dtype]) for n in (tokens, keys, keys))
            row = {"dtype": dtype, "tokens": tokens, "keys": keys, "head_dim": dim}
            with torch.no_grad():
                forms = [("sdpa_ms", torch.compile(fused, dynamic=False)),
                         ("decomposed_ms", torch.compile(decomposed, dynamic=False))]
                if dtype == "bf16" and native_attention_missing() is None:
                    kernel = torch.ops.deepcache.attention_bf16
                    forms.append(("kernel_ms", lambda q, k, v: kernel(q, k, v, q.shape[-1] ** -0.5)))
                times = {name: [] for name, _ in forms}
                for name, fn in forms:
                    fn(q, k, v)
                for _ in range(args.rounds):
                    for name, fn in forms:
                        times[name].append(benchmark.Timer("c(q, k, v)", globals=dict(c=fn, q=q, k=k, v=v),
                                                           num_threads=torch.get_num_threads()
                                                           ).blocked_autorange(min_run_time=0.7).median * 1e3)
                row.update({name: median(ms) for name, ms in times.items()})
            rows.append(row)
            print(row, flush=True)
    lines = [f"torch.compile (Inductor) on CPU, batch 2, 8 heads; {machine()['cpu']} "
             f"({torch.backends.cpu.get_cpu_capability()}, AMX: {torch.cpu._is_amx_tile_supported()}), "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds", "",
             "| dtype | tokens | keys | head dim | SDPA ms | matmul-softmax-matmul ms | deepcache kernel ms | "
             "SDPA / kernel |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kernel = r.get("kernel_ms")
        ours = f"{kernel:.2f} | {r['sdpa_ms'] / kernel:.2f}x" if kernel else " | "
        lines.append(f"| {r['dtype']} | {r['tokens']} | {r['keys']} | {r['head_dim']} | {r['sdpa_ms']:.2f} | "
                     f"{r['decomposed_ms']:.2f} | {ours} |")
    write_report(args.out, {"rows": rows, **machine()}, lines)


if __name__ == "__main__":
    main()
