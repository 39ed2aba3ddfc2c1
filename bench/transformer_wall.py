"""Wall time of a real-size diffusion transformer with block caching: ours against diffusers' FirstBlockCache.

PixArt-Sigma's transformer (600 M parameters: 28 blocks of width 1152, T5 conditioning of 300 tokens; its
published config, random weights) at 256 px (32x32 latents, 256 tokens), batch 1, DDIM 20 steps, one dtype per
process. Every candidate runs the same generation, in interleaved rounds (`sampling.interleaved`):

- `eager full` and `torch.compile full`: no caching, the model as users run it, eager and compiled;
- `diffusers FirstBlockCache eager` / `+ torch.compile`: `apply_first_block_cache` on a copy of the model,
  called as diffusers' pipelines call it, eager and under `torch.compile` (the hook's decision is a graph break);
- `ours first-block inductor (three graphs)`, `ours first-block inductor (step graph)`, `ours first-block aoti
  (step graph)`: `compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(threshold), ...)`: the same rule
  (the same decisions as diffusers' hook, tested), host-decided or decided on the device;
- `ours uniform inductor`: a fixed schedule with as many full steps as the first-block runs spent.

The threshold is tuned first (bisection, on our eager three-graph split) to spend `--full-steps` full steps.
Each candidate's full steps are reported as measured; the speedups are over `eager full` of the same run.

    python bench/transformer_wall.py                    # fp32, ~25 minutes here
    python bench/transformer_wall.py --dtype bf16       # another process for another dtype

Writes bench/results/transformer_wall_<dtype>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel

from deepcache_compile import FirstBlockRefresh, compile_deepcache
from deepcache_compile.eval.benchmark import matmul_peak, precision_dtype
from deepcache_compile.eval.refresh_study import bisect_threshold
from deepcache_compile.eval.report import machine, write_report
from deepcache_compile.eval.sampling import busy_warning, interleaved, median

OUT = Path(__file__).parent / "results"

# PixArt-alpha/PixArt-Sigma-XL-2-512-MS, transformer/config.json
PIXART_SIGMA = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=72, caption_channels=4096,
                    cross_attention_dim=1152, dropout=0.0, in_channels=4, interpolation_scale=None,
                    norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32, norm_type="ada_norm_single",
                    num_attention_heads=16, num_embeds_ada_norm=1000, num_layers=28, out_channels=8, patch_size=2,
                    sample_size=64, upcast_attention=False, use_additional_conditions=False)


class _Denoiser:
    """One transformer call as PixArt's pipeline makes it: the batch of timesteps, the learned-variance half of
    the output dropped; `.history` of whichever cache runs inside, and diffusers' hook context set around it."""

    def __init__(self, model, hooked=None, leader=None):
        self.model, self.hooked, self.leader, self.decisions = model, hooked, leader, ""

    def __call__(self, x, t, **kw):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        if self.hooked is not None:
            _set_cache_context(self.hooked, CacheContext("cond"))
        try:
            out = self.model(x, timestep=t.expand(x.shape[0]), **kw, return_dict=False)[0]
            if self.leader is not None:
                self.decisions += "F" if self.leader.state_manager.get_state().should_compute else "S"
        finally:
            if self.hooked is not None:
                _set_cache_context(self.hooked, None)
        return type("Out", (), {"sample": out[:, :x.shape[1]]})

    @property
    def history(self) -> str | None:
        """The last generation's full (F) and cached (S) steps, where a cache runs."""
        if self.leader is not None:
            return self.decisions
        history = getattr(self.model, "history", None)
        return history if isinstance(history, str) else None


def generation(denoiser, call: dict, steps: int, reset=None) -> torch.Tensor:
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    latents = call["hidden_states"]
    denoiser.decisions = ""
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(denoiser(latents, t, encoder_hidden_states=call["encoder_hidden_states"],
                                              added_cond_kwargs=call["added_cond_kwargs"]).sample, t, latents).prev_sample
    if reset is not None:
        reset()
    return latents


def hooked_copy(model, threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    hooked = copy.deepcopy(model)
    apply_first_block_cache(hooked, FirstBlockCacheConfig(threshold=threshold))
    return hooked, lambda: HookRegistry.check_if_exists_or_initialize(hooked).reset_stateful_hooks(), _leader(hooked)


def _leader(hooked):
    return hooked.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")


def tune_threshold(model, call: dict, steps: int, full_steps: int) -> float:
    def spent(threshold: float) -> int:
        dc = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(threshold))
        generation(_Denoiser(dc), call, steps)
        print(f"threshold {threshold:.4f}: {dc.history.count('F')} full steps of {steps}")
        return dc.history.count("F")

    return bisect_threshold(spent, full_steps, lo=1e-3, hi=2.0, rounds=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--full-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=PIXART_SIGMA["num_layers"])
    parser.add_argument("--candidates", nargs="+", default=None, help="a subset of the candidates, by name")
    parser.add_argument("--threshold", type=float, default=None, help="skip the tuning: this first-block threshold")
    parser.add_argument("--out", default=None, help="the record's stem (default bench/results/transformer_wall_<dtype>)")
    args = parser.parse_args()
    dtype = precision_dtype(args.dtype)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**{**PIXART_SIGMA, "num_layers": args.layers}).eval().to(dtype)
    side = args.resolution // 8
    gen = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(1, 4, side, side, generator=gen).to(dtype),
                encoder_hidden_states=torch.randn(1, 300, 4096, generator=gen).to(dtype),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    start = time.perf_counter()
    threshold = args.threshold or tune_threshold(model, call, args.steps, args.full_steps)
    tuning = time.perf_counter() - start
    policy = FirstBlockRefresh(threshold)
    hooked, reset, leader = hooked_copy(model, threshold)
    del leader  # read through the denoiser
    hooked_compiled = torch.compile(hooked)
    spent = {}

    def ours(**options):
        return compile_deepcache(model, branch=0, refresh=policy, **options)

    makers = {
        "eager full": lambda: (_Denoiser(model), None),
        "torch.compile full": lambda: (_Denoiser(torch.compile(model)), None),
        "diffusers FirstBlockCache eager": lambda: (_Denoiser(hooked, hooked, _leader(hooked)), reset),
        "diffusers FirstBlockCache + torch.compile": lambda: (_Denoiser(hooked_compiled, hooked, _leader(hooked)), reset),
        "ours first-block inductor (three graphs)": lambda: (_Denoiser(ours(backend="inductor")), None),
        "ours first-block inductor (step graph)": lambda: (_Denoiser(ours(backend="inductor", split="step")), None),
        "ours first-block aoti (step graph)": lambda: (_Denoiser(ours(backend="aoti", split="step")), None),
        "ours uniform inductor": lambda: (_Denoiser(compile_deepcache(
            model, branch=0, backend="inductor", interval=math.ceil(args.steps / args.full_steps))), None),
    }
    names = args.candidates or list(makers)
    runs, compile_seconds = {}, {}
    for name in names:
        begin = time.perf_counter()
        denoiser, after = makers[name]()
        latents = generation(denoiser, call, args.steps, after)  # compiles (first call) and warms up
        compile_seconds[name] = time.perf_counter() - begin
        runs[name] = (lambda d=denoiser, a=after: generation(d, call, args.steps, a))
        spent[name] = None if denoiser.history is None else denoiser.history.count("F")
        print(f"{name}: ready in {compile_seconds[name]:.0f} s, full steps {spent[name]}")
    times = interleaved(runs, args.repeats, progress=True)
    peak = matmul_peak(dtype)
    base = median(times["eager full"]) if "eager full" in times else None
    rows = [{"candidate": n, "median_s": median(times[n]), "runs_s": times[n], "full_steps": spent[n],
             "speedup_vs_eager_full": base / median(times[n]) if base else None, "ready_s": compile_seconds[n]}
            for n in names]
    info = {"machine": machine(), "matmul_peak_gflops": peak / 1e9, "dtype": args.dtype,
            "resolution": args.resolution, "steps": args.steps, "layers": args.layers, "threshold": threshold,
            "threshold_tuning_s": tuning, "busy": busy_warning(times), "rows": rows}
    lines = [f"PixArt-Sigma transformer ({args.layers} blocks, random weights), {args.resolution} px, batch 1, DDIM "
             f"{args.steps} steps, {args.dtype}; first-block threshold {threshold:.4f} (tuned to {args.full_steps} full "
             f"steps); {info['machine']['cpu']}, {info['machine']['threads']} threads, {args.dtype} matmul peak "
             f"{peak / 1e9:.0f} GFLOP/s; medians of {args.repeats} interleaved rounds"
             + (f". WARNING: {info['busy']}" if info["busy"] else ""), "",
             "| candidate | median s | vs eager full | full steps | ready (compile + first run) s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['speedup_vs_eager_full']:.2f}x" if r["speedup_vs_eager_full"] else ""
        full = "" if r["full_steps"] is None else r["full_steps"]
        lines.append(f"| {r['candidate']} | {r['median_s']:.2f} | {ratio} | {full} | {r['ready_s']:.0f} |")
    write_report(args.out or OUT / f"transformer_wall_{args.dtype}", info, lines)


if __name__ == "__main__":
    main()
