"""What bounding oneDNN's primitive caches buys and costs, for a server that meets many shapes from threads.

Each setting runs in a fresh process (the caches take their capacity when created), the settings taking turns
over `--rounds` rounds: the digits model's dynamic eager pair, 240 generations in 12 blocks of 20, random batch
1..4, height and width 8..24 px, 3..12 steps, every other generation from 4 threads at once. Per setting:
resident memory (after malloc_trim) after the first block and at the end, and the seconds of blocks 2..12.

    python bench/onednn_caches.py                      # settings: default (1,024), 1 (~off), 64, 256
    python bench/onednn_caches.py --settings -1 256 --rounds 3

Writes bench/results/onednn_caches.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results"

_WORKLOAD = """
import json, random, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
entries = int(sys.argv[1])
if entries != -1:
    from deepcache_compile import bound_onednn_caches
    bound_onednn_caches(entries)
from deepcache_compile import compile_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.memory import resident
from deepcache_compile.eval.sampling import ddim_loop

unet, scheduler = load_digits_model()
dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 4), height=(8, 24), width=(8, 24)))
sizes = (8, 12, 16, 20, 24)

def generate(i):
    rng = random.Random(i)
    noise = torch.randn(rng.randint(1, 4), 1, rng.choice(sizes), rng.choice(sizes))
    return ddim_loop(dc, {"sample": noise}, rng.randint(3, 12), scheduler)

pool = ThreadPoolExecutor(4)
trace, seconds = [], []
for block in range(12):
    start = time.perf_counter()
    for i in range(20):
        k = block * 20 + i
        if k % 2:
            list(pool.map(generate, range(1000 + 4 * k, 1004 + 4 * k)))
        else:
            generate(k)
    seconds.append(time.perf_counter() - start)
    trace.append(resident() / 2**20)
print(json.dumps({"trace_mb": trace, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=int, nargs="+", default=[-1, 1, 64, 256],
                        help="cache entries (-1: oneDNN's defaults, 1,024 per cache)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs = {entries: [] for entries in args.settings}
    for _ in range(args.rounds):
        for entries in args.settings:
            out = subprocess.run([sys.executable, "-c", _WORKLOAD, str(entries)], capture_output=True, text=True,
                                 check=True)
            runs[entries].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(entries, runs[entries][-1], flush=True)
    rows = []
    for entries, results in runs.items():
        first = statistics.median(r["trace_mb"][0] for r in results)
        end = statistics.median(r["trace_mb"][-1] for r in results)
        rows.append(dict(entries=entries, rss_first_block_mb=first, rss_end_mb=end, growth=end / first - 1,
                         seconds=statistics.median(sum(r["seconds"][1:]) for r in results), runs=results))
    base = next((r["seconds"] for r in rows if r["entries"] == -1), rows[0]["seconds"])
    for row in rows:
        row["time_vs_default"] = row["seconds"] / base
    from deepcache_compile.eval.report import machine, write_report

    lines = ["| oneDNN cache entries | RSS after block 1 (MB) | RSS at the end (MB) | growth | seconds, blocks 2-12 | "
             "time vs default |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {'default (1,024)' if r['entries'] < 0 else r['entries']} | {r['rss_first_block_mb']:.0f} | "
              f"{r['rss_end_mb']:.0f} | {r['growth']:+.1%} | {r['seconds']:.1f} | {r['time_vs_default']:.2f}x |"
              for r in rows]
    write_report(OUT / "onednn_caches", {"machine": machine(), "rounds": args.rounds, "rows": rows}, lines)


if __name__ == "__main__":
    main()
