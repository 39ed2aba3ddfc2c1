"""Per-step dispatch overhead of the three runtimes, on the digits model where the graphs are small enough for
overhead to show: time per U-Net call through the runtime minus the time of the same graph called directly.

    python bench/native_overhead.py            # about 3 minutes here (one AOTInductor export)

Rows: the eager `DeepCacheUNet` (vs its eager shallow graph), the Python engine on an `aoti` export and the
native runtime on the same export (both vs the AOTInductor shallow package called directly from Python).
Every call after the first is a shallow step (interval 10**6). `native (run)` calls the TorchScript method
with the flat inputs; `native (U-Net call)` adds the Python wrapper's argument handling, as a pipeline sees it.
Medians of torch.utils.benchmark, interleaved over 5 rounds.

Concurrent generations: `build/deepcache-concurrent` runs 1 or 8 generations of 50 steps (batch 1, 16 x 16) at
once on C++ threads, in one engine (one copy of the weights) with 1 AOTInductor runner (calls take turns) or
8 (model instances over the same weights): milliseconds per step of one generation and steps per second of all,
medians of 5 interleaved rounds. Writes bench/results/native_overhead.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils import benchmark

from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.report import machine, write_report

OUT = Path(__file__).parent / "results"


def _us(fn, seconds: float = 0.5) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=seconds).median * 1e6


def main() -> None:
    torch.set_num_threads(1)
    unet, scheduler = load_digits_model()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor(999)
    dc = compile_deepcache(unet, branch=0, interval=10**6)
    pair = dc.prepare(x, t)
    inputs = pair.traced.example_inputs
    with torch.no_grad():
        cache = pair.full(*inputs)[1]
    tmp = tempfile.TemporaryDirectory()
    # A dynamic batch needs an example batch > 1 (1 would be specialized); the timed calls use batch 1.
    dc.export(tmp.name, format="aoti", example={"sample": x.repeat(2, 1, 1, 1), "timestep": t}, batch=(1, 4),
              height=(8, 32), width=(8, 32), scheduler=scheduler)
    python, native = load_deepcache(tmp.name), load_deepcache(tmp.name, runtime="native")
    aoti_shallow = python._graphs.shallow
    for model in (dc, python, native):
        model(x, t)  # the full step: every later call is shallow
    rows = {
        "eager DeepCacheUNet": (lambda: dc(x, t), lambda: pair.shallow(*inputs, cache)),
        "python engine (aoti)": (lambda: python(x, t), lambda: aoti_shallow(x, t, cache)),
        "native (U-Net call)": (lambda: native(x, t), lambda: aoti_shallow(x, t, cache)),
        "native (run)": (lambda: native._native.run([x, t]), lambda: aoti_shallow(x, t, cache)),
    }
    samples = {name: [] for name in rows}
    with torch.no_grad():
        for _ in range(5):
            for name, (through, direct) in rows.items():
                samples[name].append((_us(through), _us(direct)))
    results = []
    for name, pairs in samples.items():
        call, graph = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        overhead = statistics.median(p[0] - p[1] for p in pairs)
        results.append({"runtime": name, "call_us": call, "graph_us": graph, "overhead_us": overhead})
    lines = ["| runtime | per call us | graph alone us | overhead us |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['runtime']} | {r['call_us']:.1f} | {r['graph_us']:.1f} | {r['overhead_us']:.1f} |"
              for r in results]
    concurrent = _concurrent(Path(tmp.name))
    lines += ["", "| generations at once | AOTInductor runners | ms per step (one generation) | steps/s (all) |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['generations']} | {r['runners']} | {r['ms_per_step']:.2f} | {r['steps_per_second']:.0f} |"
              for r in concurrent]
    write_report(OUT / "native_overhead", {"machine": machine(), "rows": results, "concurrent": concurrent}, lines)
    print(f"native (run) overhead is {results[1]['overhead_us'] / results[3]['overhead_us']:.1f}x below the "
          "Python engine's")


def _concurrent(directory: Path, steps: int = 50, rounds: int = 5) -> list[dict]:
    program = Path(__file__).parents[1] / "build" / "deepcache-concurrent"
    configs = [(1, 1), (8, 1), (8, 8)]  # (generations, runners)
    samples = {c: [] for c in configs}
    for _ in range(rounds):
        for generations, runners in configs:
            out = subprocess.run([str(program), str(directory), "time", str(runners), str(generations), str(steps)],
                                 capture_output=True, text=True, check=True).stdout
            samples[generations, runners].append(json.loads(out))
    return [{"generations": g, "runners": r,
             "ms_per_step": statistics.median(x["ms_per_step"] for x in samples[g, r]),
             "steps_per_second": statistics.median(x["steps_per_second"] for x in samples[g, r])}
            for g, r in configs]


if __name__ == "__main__":
    main()
