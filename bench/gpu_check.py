"""CUDA paths, checked against eager and timed: one prepared run for a machine with an NVIDIA GPU.

    bash bench/gpu_check.sh            # about 5-8 minutes on one H100

For the tiny-sd preset (correctness) and SD 1.5 at 512 px, batch 2, fp16 (latency): eager, Inductor,
AOTInductor, onnxruntime-gpu and TensorRT where installed. Prints one line per path; never fails the whole
run because one optional runtime is missing.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback

import torch
from torch.utils import benchmark

from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.presets import build_unet, example_call


def _ms(fn) -> float:
    torch.cuda.synchronize()
    return benchmark.Timer("fn(); torch.cuda.synchronize()", globals={"fn": fn, "torch": torch}
                           ).blocked_autorange(min_run_time=1.0).median * 1e3


def _check(name, make, unet, call, reference):
    start = time.perf_counter()
    try:
        dc = make()
        pair = dc.prepare(**call)
        inputs = pair.traced.example_inputs
        with torch.no_grad():
            sample, cache = pair.full(*inputs)
            err = (sample.float() - reference.float()).abs().max().item()
            full_ms = _ms(lambda: pair.full(*inputs))
            shallow_ms = _ms(lambda: pair.shallow(*inputs, cache))
        print(f"{name:<28} ok  max|diff| {err:.3g}  full {full_ms:8.2f} ms  shallow {shallow_ms:7.2f} ms  "
              f"ratio {full_ms / shallow_ms:5.2f}x  (compile {time.perf_counter() - start:.0f} s)", flush=True)
    except Exception as err:  # one missing runtime must not hide the others
        print(f"{name:<28} FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        traceback.print_exc(limit=2, file=sys.stdout)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for preset, px, dtype in (("tiny-sd", 64, torch.float32), ("sd15", 512, torch.float16)):
        unet = build_unet(preset, dtype=dtype).cuda()
        call = example_call(unet, batch=2, height=px // 8, width=px // 8)
        with torch.no_grad():
            reference = unet(**call).sample
            eager_ms = _ms(lambda: unet(**call))
        print(f"\n{preset} {px}px batch 2 {dtype}: eager U-Net {eager_ms:.2f} ms", flush=True)
        for backend in ("eager", "inductor", "aoti", "onnxruntime", "tensorrt"):
            _check(f"{backend} b=1", lambda b=backend: compile_deepcache(unet, branch=1, interval=5, backend=b),
                   unet, call, reference)
        if preset == "tiny-sd":
            for fmt in ("pt2", "aoti", "onnx", "tensorrt"):
                start = time.perf_counter()
                try:
                    dc = compile_deepcache(unet, branch=1, interval=5)
                    with tempfile.TemporaryDirectory() as tmp:
                        dc.export(tmp, format=fmt, example=call)
                        engine = load_deepcache(tmp, device="cuda")
                        out = engine(**call).sample
                    err = (out - reference).abs().max().item()
                    print(f"export {fmt:<21} ok  max|diff| {err:.3g} ({time.perf_counter() - start:.0f} s)", flush=True)
                except Exception as err:
                    print(f"export {fmt:<21} FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
