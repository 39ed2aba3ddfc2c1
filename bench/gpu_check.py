"""CUDA paths, checked against eager and timed: one prepared run for a machine with an NVIDIA GPU.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py

1. SD 1.5 architecture at 512 px, fp16, 50 DDIM steps, batch 2, branch 1, N=5: the eager U-Net, `torch.compile`
   of the U-Net, the reference helper (when PyPI `DeepCache` is installed) and this project with eager, Inductor
   with CUDA graphs (mode="reduce-overhead"), AOTInductor, ONNX Runtime (CUDA EP) and TensorRT, timed
   interleaved by `deepcache-compile bench`'s harness (`run_benchmark`), which checks every compiled pair against
   the eager graphs once (`verify`) and every loop's final latents against the eager loop in fp16. The table
   goes to bench/results/gpu/.
2. The tiny-sd preset in fp32: every backend per call, every export format (TensorRT engine files built and
   loaded) and the native runtime, against eager.
3. A Flux-architecture transformer at full width (3072, 24 heads; 2 dual-stream + 4 single-stream blocks to fit
   the time), 512 px (1,024 image tokens, 512 text tokens), bf16 and fp16, 20 steps of a flow-matching Euler
   loop: first-block caching decided on the host (three graphs) and on the device (`split="step"`) with Inductor
   and AOTInductor against the eager host-decided run (same decisions, latents within the dtype's loop
   tolerance), timed against the eager model and diffusers' FirstBlockCache with the same threshold. In bf16 also
   the model's linears quantized by torchao (float8 with per-row scales, on GPUs of compute capability 8.9 and
   up; int8 dynamic): the eager quantized model, and first-block caching with Inductor on the device-decided step
   graph against the eager host-decided run of the same quantized model (a row is skipped where torchao or the
   GPU's float8 is missing).
The run exits 1 if a path fails, a pair fails its verification, or a loop's latents differ from eager by more
than the tolerance of its dtype; a runtime that is not installed is reported as skipped and does not fail.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import traceback

import torch
from torch.utils import benchmark

from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.calls import example_call
from deepcache_compile.eval.benchmark import BenchOptions, markdown_table, run_benchmark
from deepcache_compile.eval.presets import build_unet
from deepcache_compile.runtime.pair import VERIFY_TOLERANCE

# Relative max error against eager, per call: rounding-level differences of fused kernels pass, a wrong
# graph (a dropped or reordered layer, a stale cache) gives O(1) and fails.
# Final latents of a 50-step loop against the eager loop: fp16 rounding compounds over the steps, a stale or
# overwritten cache is O(1).
LOOP_TOLERANCE = {"fp32": 1e-2, "fp16": 1e-1, "bf16": 2e-1}
SD15_BACKENDS = ("eager", "inductor:mode='reduce-overhead'", "aoti", "onnxruntime", "tensorrt")


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
        timing = f"full {full_ms:8.2f} ms  shallow {shallow_ms:7.2f} ms  ratio {full_ms / shallow_ms:5.2f}x"
        return error, VERIFY_TOLERANCE[reference.dtype], timing
    return check


def _export_check(unet, call, reference, fmt, runtime="python"):
    def check():
        dc = compile_deepcache(unet, branch=1, interval=5)
        with tempfile.TemporaryDirectory() as tmp:
            dc.export(tmp, format=fmt, example=call)
            engine = load_deepcache(tmp, device="cuda", runtime=runtime)
            out = engine(**call).sample
        return relative_error(out, reference), VERIFY_TOLERANCE[reference.dtype], "first (full) step of the engine"
    return check


def sd15_loops(results: list) -> None:
    """Part 1: the timed, checked loops; each row that failed or drifted fails the run."""
    import importlib.util

    backends = tuple(b for b in SD15_BACKENDS
                     if b != "tensorrt" or importlib.util.find_spec("torch_tensorrt") is not None)
    rows = run_benchmark(BenchOptions(preset="sd15", resolution=512, batch=2, steps=50, branch=1, intervals=(5,),
                                      schedules=("uniform",), backends=backends, dtypes=("fp16",), device="cuda",
                                      repeats=3, min_run_time=1.0, out="bench/results/gpu"))
    print(markdown_table(rows), flush=True)
    for r in rows:
        error = r.get("latent_error")
        ok = "error" not in r and (error is None or error <= LOOP_TOLERANCE[r["dtype"]])
        results.append(ok)
        if not ok:
            print(f"FAIL {r['name']}: {r.get('error') or f'latents differ from eager by {error:.3g}'}", flush=True)


FLUX_WIDE = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                 axes_dims_rope=(16, 56, 56))


def _flux_loop(model, call: dict, steps: int = 20) -> torch.Tensor:
    """A flow-matching Euler loop (sigma from 1 to 0) over `model`; returns the latents."""
    x = call["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    with torch.no_grad():
        for i in range(steps):
            t = sigmas[i].expand(x.shape[0]).to(x.dtype)
            v = model(**{**call, "hidden_states": x, "timestep": t}).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def _quantized_check(model, call: dict, policy, precision: str, reference: torch.Tensor, candidates: dict):
    """A copy of `model` with torchao's float8 (per-row) or int8 (dynamic) linears: the eager host-decided loop and
    Inductor's device-decided step graph, the same decisions and latents within the bf16 loop tolerance; both
    join the timed candidates."""
    def check():
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

        if precision == "float8" and torch.cuda.get_device_capability() < (8, 9):
            raise ImportError("float8 needs compute capability 8.9 or more (H100, L4, RTX 40xx)")
        quantized = copy.deepcopy(model)
        quantize_(quantized, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if precision == "float8"
                  else Int8DynamicActivationInt8WeightConfig())
        host = compile_deepcache(quantized, branch=0, refresh=policy)
        expected = _flux_loop(host, call)
        dc = compile_deepcache(quantized, branch=0, refresh=policy, backend="inductor", split="step")
        out = _flux_loop(dc, call)
        candidates[f"{precision} eager full"] = quantized
        candidates[f"ours {precision} inductor (step)"] = dc
        same = dc.history == host.history
        return relative_error(out, expected) if same else float("inf"), LOOP_TOLERANCE["bf16"], \
            f"history {dc.history} (host {host.history}); vs bf16 latents {relative_error(expected, reference):.3g}"
    return check


def flux_rows(results: list, dtype: torch.dtype) -> None:
    """Part 3: the transformer paths, checked and timed."""
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    from deepcache_compile import FirstBlockRefresh

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_WIDE).to("cuda", dtype).eval()
    g = torch.Generator("cuda").manual_seed(0)
    call = dict(hidden_states=torch.randn(1, 1024, 64, device="cuda", generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=dtype),
                pooled_projections=torch.randn(1, 768, device="cuda", generator=g, dtype=dtype),
                img_ids=torch.zeros(1024, 3, device="cuda"), txt_ids=torch.zeros(512, 3, device="cuda"))
    policy = FirstBlockRefresh(0.12)
    host = compile_deepcache(model, branch=0, refresh=policy)
    reference = _flux_loop(host, call)
    name = str(dtype).removeprefix("torch.")
    candidates = {"eager full": model, "ours eager (host)": host}
    for backend, split in (("inductor", "three"), ("inductor", "step"), ("aoti", "step")):
        def check(backend=backend, split=split):
            dc = compile_deepcache(model, branch=0, refresh=policy, backend=backend, split=split)
            out = _flux_loop(dc, call)
            candidates[f"ours {backend} ({split})"] = dc
            same = dc.history == host.history
            return relative_error(out, reference) if same else float("inf"), LOOP_TOLERANCE[name], \
                f"history {dc.history} (host {host.history})"
        _run_path(f"flux {name} {backend} {split}", check, results)
    hooked = copy.deepcopy(model)
    apply_first_block_cache(hooked, FirstBlockCacheConfig(threshold=policy.threshold))

    def theirs(**kw):
        _set_cache_context(hooked, CacheContext("cond"))
        try:
            return hooked(**kw)
        finally:
            _set_cache_context(hooked, None)

    candidates["diffusers FirstBlockCache"] = theirs
    if dtype == torch.bfloat16:
        for precision in ("float8", "int8"):
            _run_path(f"flux {precision} inductor step", _quantized_check(model, call, policy, precision, reference,
                                                                          candidates), results)
    for label, fn in candidates.items():
        seconds = _ms(lambda fn=fn: _flux_loop(fn, call)) / 1e3
        print(f"flux {name} 20 steps  {label:<28} {seconds:7.3f} s", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    results: list[bool] = []
    def loops():  # its rows are counted by sd15_loops; here only an exception fails the part
        sd15_loops(results)
        return 0.0, 1.0, "every row checked above"

    _run_path("sd15 512px fp16 loops", loops, results)
    unet = build_unet("tiny-sd").cuda()
    call = example_call(unet, batch=2, height=8, width=8)
    with torch.no_grad():
        reference = unet(**call).sample
    for backend in ("eager", "inductor", "aoti", "onnxruntime", "tensorrt"):
        _run_path(f"tiny-sd {backend}", _backend_check(unet, call, reference, backend), results)
    for fmt in ("pt2", "aoti", "onnx", "tensorrt"):
        _run_path(f"export {fmt}", _export_check(unet, call, reference, fmt), results)
    # The C++ runtime of kernels/ on the device (needs `make native` on the GPU machine).
    _run_path("export aoti, native runtime", _export_check(unet, call, reference, "aoti", "native"), results)
    for dtype in (torch.bfloat16, torch.float16):
        try:
            flux_rows(results, dtype)
        except Exception as err:  # the part fails, the rest of the report stands
            print(f"flux {dtype} FAIL  {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
            results.append(False)
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed", flush=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
