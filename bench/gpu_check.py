"""CUDA paths, checked against eager and timed: one prepared run for a machine with an NVIDIA GPU.

    python bench/gpu_check.py            # about 5-8 minutes on one H100

For the tiny-sd preset (fp32) and SD 1.5 at 512 px, batch 2, fp16: every backend (eager, inductor, aoti,
onnxruntime, tensorrt), every export format where its runtime is installed, and the native runtime. Each path's full-step output is
compared with the eager U-Net and its shallow-step output with the eager shallow graph, as the relative max
error max|a - b| / max|b|. The run exits 1 if any path exceeds the tolerance of its dtype or fails with an
error; a runtime that is not installed is reported as skipped and does not fail the run.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback

import torch
from torch.utils import benchmark

from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.calls import example_call
from deepcache_compile.eval.presets import build_unet

# Relative max error against eager, per call: rounding-level differences of fused kernels pass, a wrong
# graph (a dropped or reordered layer, a stale cache) gives O(1) and fails.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _ms(fn) -> float:
    torch.cuda.synchronize()
    return benchmark.Timer("fn(); torch.cuda.synchronize()", globals={"fn": fn, "torch": torch}
                           ).blocked_autorange(min_run_time=1.0).median * 1e3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()


def _run_path(name: str, check, results: list) -> None:
    """Runs one check `() -> (error, tolerance, extra text)`; records PASS / FAIL / SKIP."""
    start = time.perf_counter()
    try:
        error, tolerance, text = check()
    except ImportError as err:
        print(f"{name:<28} SKIP  {str(err).splitlines()[0][:160]}", flush=True)
        return
    except Exception as err:  # one broken runtime must not hide the others, but it fails the run
        print(f"{name:<28} FAIL  {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        traceback.print_exc(limit=2, file=sys.stdout)
        results.append(False)
        return
    ok = error <= tolerance
    results.append(ok)
    print(f"{name:<28} {'PASS' if ok else 'FAIL'}  rel.err {error:.3g} (tol {tolerance:g})  {text}  "
          f"({time.perf_counter() - start:.0f} s)", flush=True)


def _backend_check(unet, call, reference, backend):
    def check():
        pair = compile_deepcache(unet, branch=1, interval=5, backend=backend).prepare(**call)
        inputs = pair.traced.example_inputs
        with torch.no_grad():
            sample, cache = pair.full(*inputs)
            shallow = pair.shallow(*inputs, cache)[0]
            shallow_ref = pair.split.shallow(*inputs, cache)[0]
            full_ms, shallow_ms = _ms(lambda: pair.full(*inputs)), _ms(lambda: pair.shallow(*inputs, cache))
        error = max(relative_error(sample, reference), relative_error(shallow, shallow_ref))
        return error, TOLERANCE[reference.dtype], (f"full {full_ms:8.2f} ms  shallow {shallow_ms:7.2f} ms  "
                                                   f"ratio {full_ms / shallow_ms:5.2f}x")
    return check


def _export_check(unet, call, reference, fmt, runtime="python"):
    def check():
        dc = compile_deepcache(unet, branch=1, interval=5)
        with tempfile.TemporaryDirectory() as tmp:
            dc.export(tmp, format=fmt, example=call)
            engine = load_deepcache(tmp, device="cuda", runtime=runtime)
            out = engine(**call).sample
        return relative_error(out, reference), TOLERANCE[reference.dtype], "first (full) step of the engine"
    return check


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    results: list[bool] = []
    for preset, px, dtype in (("tiny-sd", 64, torch.float32), ("sd15", 512, torch.float16)):
        unet = build_unet(preset, dtype=dtype).cuda()
        call = example_call(unet, batch=2, height=px // 8, width=px // 8)
        with torch.no_grad():
            reference = unet(**call).sample
            eager_ms = _ms(lambda: unet(**call))
        print(f"\n{preset} {px}px batch 2 {dtype}: eager U-Net {eager_ms:.2f} ms", flush=True)
        for backend in ("eager", "inductor", "aoti", "onnxruntime", "tensorrt"):
            _run_path(f"{backend} b=1", _backend_check(unet, call, reference, backend), results)
        if preset == "tiny-sd":
            for fmt in ("pt2", "aoti", "onnx", "tensorrt"):
                _run_path(f"export {fmt}", _export_check(unet, call, reference, fmt), results)
            # The C++ runtime of kernels/ on the device (needs `make native` on the GPU machine).
            _run_path("export aoti, native runtime", _export_check(unet, call, reference, "aoti", "native"), results)
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
