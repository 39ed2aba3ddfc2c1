"""Cold start: the time from a new process to its first denoising step, three ways, each in a fresh process.

- `compile`: `compile_deepcache(..., backend="aoti")` with an empty compile cache (what every new replica pays
  without one; it also fills the cache);
- `cache`: the same call in a new process with that cache (`cache_dir`): the graphs are traced and keyed, and the
  packages loaded instead of compiled;
- `engine`: `load_deepcache(dir)` on an `aoti` export made beforehand (no model code, no trace), twice: the first
  load on a machine unpacks each package's model library once (`formats.aoti.unpacked_library`), later loads (a
  restarted replica, another replica on the machine) open it in place.

Phases per process: `import` (torch, diffusers and the compiler; the engine: torch and the engine runtime only),
`weights` (build or load the model), `hash` (the SHA-256 of every weight, which the cache key needs; none for the
engine), `compile/load` (`prepare`, or `load_deepcache`) and `first step` (one full step). Models: the digits
DDPM (16 px, batch 2) and the SD 1.5 architecture (random weights, 256 px, batch 2; `--sd15-resolution` adds
sizes). One process per cell, run in turn (the machine's other load shows as noise: rerun to compare).

    python bench/cold_start.py                      # 15-30 minutes, most of it compiling SD 1.5 twice
    python bench/cold_start.py --models digits      # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

OUT = Path(__file__).parent / "results"

_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    mode, model, size, where = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import torch
    from deepcache_compile import load_deepcache
    if mode != "engine":  # an engine replica needs neither diffusers nor the compiler
        import diffusers
        from deepcache_compile import compile_deepcache
        from deepcache_compile.artifacts.cache import tensor_digest
        from deepcache_compile.eval.digits import load_digits_model
        from deepcache_compile.eval.presets import build_unet
    times = {"import": time.perf_counter() - t0}
    torch.manual_seed(0)
    t = time.perf_counter()
    if mode == "engine":
        times["weights"] = times["hash"] = 0.0
        dc = load_deepcache(where)
        times["compile/load"] = time.perf_counter() - t
    else:
        unet = load_digits_model()[0] if model == "digits" else build_unet("sd15")
        times["weights"] = time.perf_counter() - t
        t = time.perf_counter()
        for p in [*unet.parameters(), *unet.buffers()]:
            tensor_digest(p)
        times["hash"] = time.perf_counter() - t
    gen = torch.Generator().manual_seed(1)  # the same inputs whether or not weights were drawn before
    call = ({"sample": torch.randn(2, 1, 16, 16, generator=gen), "timestep": torch.tensor(999)} if model == "digits"
            else {"sample": torch.randn(2, 4, size // 8, size // 8, generator=gen), "timestep": torch.tensor(999),
                  "encoder_hidden_states": torch.randn(2, 77, 768, generator=gen)})
    if mode != "engine":
        t = time.perf_counter()
        dc = compile_deepcache(unet, branch=1, interval=5, backend="aoti", cache_dir=where)
        dc.prepare(**call)
        times["compile/load"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        out = dc(**call).sample
    times["first step"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    torch.save(out, where.rstrip("/") + f".{mode}.pt")
    print(json.dumps(times))
""")

_EXPORT = textwrap.dedent("""
    import sys, torch
    from deepcache_compile import compile_deepcache
    from deepcache_compile.eval.digits import load_digits_model
    from deepcache_compile.eval.presets import build_unet, example_call
    model, size, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    if model == "digits":
        unet, call = load_digits_model()[0], {"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)}
        ranges = dict(height=(16, 16), width=(16, 16))
    else:
        unet = build_unet("sd15")
        call = example_call(unet, batch=2, height=size // 8, width=size // 8)
        ranges = dict(height=(size // 8, size // 8), width=(size // 8, size // 8))
    compile_deepcache(unet, branch=1, interval=5).export(where, format="aoti", example=call, batch=(1, 4), **ranges)
""")


def _child(script: str, *args: str, inductor_cache: str) -> dict:
    """Runs `script` in a new process whose Inductor cache folder (compiled kernels, unpacked engine libraries)
    is `inductor_cache`: a fresh one per benchmark run, so that nothing compiled before the run is reused."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1]) if script is _CHILD else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "sd15"], choices=["digits", "sd15"])
    parser.add_argument("--sd15-resolution", type=int, nargs="+", default=[256])
    parser.add_argument("--out", default=str(OUT / "cold_start"))
    args = parser.parse_args()

    import torch

    from deepcache_compile.eval.report import machine, write_report

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for size in ([16] if model == "digits" else args.sd15_resolution):
                cache, engine = f"{tmp}/{model}{size}-cache", f"{tmp}/{model}{size}-engine"
                fresh = dict(inductor_cache=f"{tmp}/inductor")
                cells = {"compile": _child(_CHILD, "compile", model, str(size), cache, **fresh),
                         "cache": _child(_CHILD, "cache", model, str(size), cache, **fresh)}
                _child(_EXPORT, model, str(size), engine, **fresh)
                # the first load on a machine unpacks each package's library (formats/aoti.py); later ones reuse it
                cells["engine, first load"] = _child(_CHILD, "engine", model, str(size), engine, **fresh)
                Path(f"{engine}.engine.pt").rename(f"{engine}.engine, first load.pt")
                cells["engine"] = _child(_CHILD, "engine", model, str(size), engine, **fresh)
                first = torch.load(f"{cache}.compile.pt")
                other = {m: torch.load(f"{(cache if m == 'cache' else engine)}.{m}.pt")
                         for m in ("cache", "engine, first load", "engine")}
                same = {m: "bitwise" if torch.equal(first, o) else
                        f"{((o - first).abs().max() / first.abs().max()).item():.1e} rel."
                        for m, o in other.items()}
                for mode, times in cells.items():
                    rows.append({"model": model, "pixels": size, "start": mode, **times,
                                 "vs compile": cells["compile"]["total"] / times["total"],
                                 "first_step_vs_compile": same.get(mode, "")})
    host = machine()
    phases = ["import", "weights", "hash", "compile/load", "first step", "total"]
    lines = [f"Cold start to the first step ({host.get('cpu', '')}, torch {torch.__version__}; seconds)", "",
             "| model | px | start | " + " | ".join(phases) + " | vs compile | same first step |",
             "| --- | --- | --- | " + " | ".join("---" for _ in phases) + " | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pixels']} | {r['start']} | "
                     + " | ".join(f"{r[p]:.2f}" for p in phases)
                     + f" | {r['vs compile']:.1f}x | {r['first_step_vs_compile']} |")
    write_report(args.out, {"machine": host, "rows": rows}, lines)


if __name__ == "__main__":
    main()
