"""Soak the runtime: 1,000 generations of the shipped digits model (random sizes, batch sizes, step counts,
schedules, backends, threads on and off, a few NaN inputs), each compared with its run alone.

    python bench/soak.py                      # 1,000 generations, every backend; writes bench/results/soak.json
    python bench/soak.py --generations 200 --backends eager eager-dynamic
    python bench/soak.py --onednn-cache -1      # oneDNN's own cache sizes (1,024 entries per thread)

Exits 1 when a check fails: an output differs from its run alone, a generation errs (or a NaN one does not),
resident memory after the warm-up grows by 5 % or more, more pairs are held than the LRU allows, or a file is
left in the temp folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from deepcache_compile.eval.report import machine
from deepcache_compile.eval.soak import BACKENDS, run_soak
from deepcache_compile.runtime.onednn import DEFAULT_ENTRIES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warm-shapes", dest="warm_shapes", action="store_false",
                        help="skip running every shape once before the warm-up generations")
    parser.add_argument("--onednn-cache", type=int, default=DEFAULT_ENTRIES,
                        help="entries of oneDNN's primitive caches, set before the first convolution (-1: the "
                             "library defaults)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    report = run_soak(args.generations, tuple(args.backends), args.seed, onednn_cache=args.onednn_cache,
                      warm_shapes=args.warm_shapes)
    result = {**dataclasses.asdict(report), "rss_growth": report.rss_growth, "passed": report.passed,
              "backends": args.backends, "warm_shapes": args.warm_shapes, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{report.generations} generations ({report.threaded} from threads, {report.broken_refused} NaN inputs "
          f"refused) in {report.seconds:.0f} s; resident memory {report.rss_warm_mb:.0f} MB after warm-up -> "
          f"{report.rss_end_mb:.0f} MB ({report.rss_growth:+.2%}; {report.live_end_mb:.0f} MB "
          f"after malloc_trim); most pairs held {report.most_pairs}; "
          f"mismatches {len(report.mismatches)}, errors {len(report.errors)}, temp files left {report.temp_left}")
    for line in (report.mismatches + report.errors)[:20]:
        print("  ", line)
    print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
