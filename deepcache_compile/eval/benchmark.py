"""Latency benchmarks: DeepCache against the baselines a user would pick instead, measured in one run.

For one preset, resolution, batch and step count, and for each dtype, it measures
- DDIM loop latency of: the eager U-Net, `torch.compile` of the U-Net, the reference helper
  (`DeepCacheSDHelper` from PyPI `DeepCache`, when installed), all in that dtype, and `compile_deepcache` per
  backend, schedule and interval; plus the fp32 eager U-Net, the common reference row of every dtype. All of
  one dtype's rows run interleaved repeat by repeat, so that machine noise hits all alike;
- per-call latency of the full and shallow graphs (torch.utils.benchmark medians) per backend;
- MACs (FlopCounterMode) of full and shallow graphs, hence each row's MAC-bound speedup and FLOPs;
- this machine's matmul peak per dtype (a large `torch.matmul`, best of several; int8: `torch._int_mm`, int8
  inputs and int32 sums), hence each row's roofline time (its loop's FLOPs at that peak) and the fraction of it
  reached (roofline / measured);
- int8 (`precision.Int8`, where torchao is installed): the fp32 U-Net quantized, calibrated on the calls of one
  generation of the timed loop; its rows are DeepCache on the backends that lower int8 (inductor, aoti) and the
  whole U-Net quantized the same way under `torch.compile` (the int8 model without DeepCache). Their latents
  are compared with the fp32 references (so the column shows the int8 error, not only a miscompilation);
- memory: what compiling each configuration added to the resident set (its own copy of the weights, packed
  kernels, ...) and the peak above the pre-run resident set while it ran (activations, workspaces);
- dispatch efficiency = (F * t_full + S * t_shallow) / measured loop time, from the per-graph medians;
- each row's final latents against the eager reference in its dtype (the eager U-Net for the compiled U-Net,
  the eager DeepCache pair on the same schedule for DeepCache rows and the reference helper), as the relative
  max error `max|a - b| / max|b|`: a stale or overwritten cache shows as O(1).
A backend that fails to compile for a dtype (e.g. onnxruntime has no bf16 convolution on CPU) gives a row with
its error instead of times. Rows go to CSV and JSON with every setting, the machine and library versions; a
Markdown table and PNG plots are written beside them.
"""

from __future__ import annotations

import ast
import copy
import csv
import gc
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from ..api import compile_deepcache
from ..calls import CallFlattener
from ..graph import quantize
from ..graph.macs import graph_macs, node_macs
from ..graph.trace import trace_unet
from ..precision import INT8_BACKENDS, Int8, record_calls
from ..runtime.backends import runnable_backends
from ..schedule import DEFAULT_CENTER, mac_speedup, make_schedule
from .memory import peak_during, resident
from .presets import DTYPES, build_unet, example_call
from .report import machine
from .sampling import ddim_loop, median, median_ms, timed

__all__ = ["BenchOptions", "DTYPES", "PRECISIONS", "run_benchmark", "markdown_table", "matmul_peak", "parse_backend",
           "precision_dtype"]

_GB = 1e9


@dataclass(frozen=True)
class BenchOptions:
    """What `run_benchmark` compares. `dtypes` / `backends` None: every dtype / backend the device runs
    (`default_dtypes`, `runnable_backends`). A backend may carry options: "inductor:freezing=False",
    "onnxruntime:share_weights=False" (`parse_backend`)."""

    preset: str = "sd15"
    resolution: int = 256  # image pixels (latent = /8)
    batch: int = 2  # CFG doubles the prompt batch
    steps: int = 10
    branch: int = 1
    intervals: tuple[int, ...] = (2, 3, 5, 10)
    schedules: tuple[str, ...] = ("uniform", "nonuniform")
    backends: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    baselines: tuple[str, ...] = ("unet-eager", "unet-compile", "reference-helper")
    device: str = "cpu"
    repeats: int = 3
    min_run_time: float = 6.0  # seconds of per-graph timing (after one warm-up call)
    out: str = "out/bench"  # ignored by git; the recorded runs pass --out bench/results/...
    # Time every dtype's candidates in one interleaved loop (one fp32 reference for all) instead of one loop per
    # dtype: the dtypes' ratios then share the machine's state, and the resident set holds every dtype's copies.
    one_loop: bool = False


# The precisions the benchmark compares: the float dtypes, and int8 (the fp32 model quantized, `precision.Int8`).
PRECISIONS = (*DTYPES, "int8")


def precision_dtype(name: str) -> torch.dtype:
    """The dtype the model's weights are in for a precision (int8 quantizes the fp32 model)."""
    return torch.float32 if name == "int8" else DTYPES[name]


def default_dtypes(device: str) -> tuple[str, ...]:
    """fp32 and the reduced precisions the device has fast kernels for: on CPU bf16 / fp16 only where oneDNN
    reports them (AVX-512 BF16 / AMX, AVX-512 FP16), and int8 where torchao is installed; fp16 and bf16 on
    CUDA."""
    if torch.device(device).type == "cuda":
        return ("fp32", "fp16", "bf16")
    fast = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
            "int8": importlib.util.find_spec("torchao") is not None}
    return ("fp32", *(name for name, supported in fast.items() if supported))


def parse_backend(spec: str) -> tuple[str, dict]:
    """"name" or "name:key=value,key=value" (values are Python literals) -> (name, options).

    Example:
        >>> parse_backend("inductor:freezing=False")
        ('inductor', {'freezing': False})
    """
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"backend spec {spec!r}: write options as name:key=value,key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"backend spec {spec!r}: {value!r} is not a Python literal (True, 3, 'max-autotune')"
                             ) from err
    return name, options


def matmul_peak(dtype: torch.dtype | str, device: str = "cpu", largest: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul throughput in FLOP/s for `dtype` (or a precision name, "int8" among them): the best
    of `repeats` n x n `torch.matmul` runs (int8: `torch._int_mm`, int8 inputs, int32 sums), n doubled from 256
    up to `largest` while one run takes under 50 ms (so that a dtype without fast kernels, e.g. bf16 on a CPU
    without AVX-512 BF16, is measured in seconds, not minutes). On a shared machine a neighbour's load lowers
    it: `run_benchmark` measures it before and after the timed runs and keeps the best."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    int8 = dtype in ("int8", torch.int8)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    n = 128
    while True:
        n *= 2
        if int8:
            a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        else:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))

        def run():
            torch._int_mm(a, b) if int8 else torch.matmul(a, b)
            sync()

        run()
        seconds = timed(run)[1]
        if n >= largest or seconds > 0.05:
            break
    return 2 * n**3 / min(seconds, *(timed(run)[1] for _ in range(repeats - 1)))


def _reference_helper(unet, branch: int, interval: int, call: dict, steps: int):
    """The reference helper on the same U-Net and scheduler; None when PyPI `DeepCache` is not installed.

    The helper finds the step by looking the timestep up in `pipe.scheduler.timesteps`; `ddim_loop`'s
    scheduler has the same timesteps.
    """
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return None
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def loop():
        helper.enable()
        try:
            return ddim_loop(unet, call, steps, scheduler)
        finally:
            helper.disable()

    return loop


@dataclass
class _Candidate:
    name: str
    run: Callable[[], None] | None  # None: it failed to build (see settings["error"])
    settings: dict
    full_steps: int  # of opts.steps
    held: int = 0  # bytes compiling it added to the resident set
    graphs: tuple[float, float] | None = None  # per-call ms of the full and shallow graphs
    reference: tuple | None = None  # what its latents are checked against: ("unet",) or ("deepcache", kind, N)
    peaks: list[int] = field(default_factory=list)  # bytes above the pre-run resident set, per run


def run_benchmark(opts: BenchOptions) -> list[dict]:
    """Runs the benchmark and writes CSV, JSON, Markdown and plots under `opts.out`; returns the rows.

    One interleaved run per dtype (a dtype's compiled graphs are released before the next is built, so that the
    resident set holds one dtype's copies at a time), or with `one_loop` one run of every dtype's candidates and
    one fp32 reference. Inductor's freezing is on for the whole run, so the
    `torch.compile` baseline and the inductor backend compile under the same setting (and the baseline never
    recompiles because the setting changed); "inductor:freezing=False" measures the backend without it.

    Example:
        >>> rows = run_benchmark(BenchOptions(preset="tiny-sd", resolution=64, steps=4, backends=("eager",)))
    """
    dtypes = opts.dtypes or default_dtypes(opts.device)
    backends = opts.backends or runnable_backends(opts.device)
    for name in dtypes:
        if name not in PRECISIONS:
            raise ValueError(f"dtype {name!r} is unknown: choose from {PRECISIONS}")
    for spec in backends:
        parse_backend(spec)
    with torch._inductor.config.patch(freezing=True):
        peaks = {name: matmul_peak(name, opts.device) for name in {"fp32", *dtypes}}
        unet32 = build_unet(opts.preset).to(opts.device)
        latent = opts.resolution // 8
        call32 = example_call(unet32, batch=opts.batch, height=latent, width=latent)
        macs = _macs(unet32, call32, opts.branch)
        def fp32_base() -> _Candidate:  # the eager fp32 U-Net, the reference a run's ratios divide
            return _Candidate("unet-eager fp32", lambda: ddim_loop(unet32, call32, opts.steps),
                              {"backend": "eager", "dtype": "fp32"}, opts.steps)

        base = fp32_base()  # with one_loop, every dtype's; otherwise each dtype's run times its own
        runs = []
        for name in dtypes:
            runs.append([base if opts.one_loop else fp32_base(), *_build_dtype(opts, name, backends, unet32, call32)])
            if not opts.one_loop:
                _time_interleaved(runs[-1], opts, name)
                for c in runs[-1][1:]:  # drop the compiled graphs before the next dtype's are built
                    c.run = c.run and (lambda: None)
                torch._dynamo.reset()  # releases the compiled U-Net's cache entries (and their frozen weights)
                gc.collect()
        if opts.one_loop:
            _time_interleaved([base, *(c for run in runs for c in run[1:])], opts, "+".join(dtypes))
        peaks = {name: max(peak, matmul_peak(name, opts.device)) for name, peak in peaks.items()}
        parameters = _parameters(unet32)
        rows = [row for i, (name, candidates) in enumerate(zip(dtypes, runs))
                for row in _rows(candidates, macs, peaks, parameters, opts, name, not (opts.one_loop and i))]
    _write(rows, opts)
    return rows


def _macs(unet, call: dict, branch: int) -> tuple[int, int]:
    """MACs of a full and a shallow step (dtype independent)."""
    pair = compile_deepcache(unet, branch=branch).prepare(**call)
    macs = node_macs(pair.traced.gm, pair.traced.example_inputs)
    return sum(macs.values()), graph_macs(pair.split.shallow, macs)


def _build_dtype(opts: BenchOptions, dtype_name: str, backends, unet32, call32) -> list[_Candidate]:
    """Builds one dtype's candidates (baselines and DeepCache pairs), each run once to check its latents."""
    dtype = precision_dtype(dtype_name)
    unet = unet32 if dtype == torch.float32 else copy.deepcopy(unet32).to(dtype)
    call = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call32.items()}
    int8 = None
    if dtype_name == "int8":  # calibrated on one generation of the timed loop
        int8 = Int8(record_calls(unet32, lambda: ddim_loop(unet32, call32, opts.steps)))
        backends = [spec for spec in backends if parse_backend(spec)[0] in INT8_BACKENDS[1:]]
    bar = tqdm(total=len(backends) + 1, desc=f"compiling {dtype_name}", leave=False)
    candidates = _int8_baselines(unet, call, opts, int8) if int8 else _baselines(unet, call, opts, dtype_name)
    bar.update()
    for spec in backends:
        candidates += _deepcache_candidates(unet, call, opts, spec, dtype_name, int8)
        bar.update()
    bar.close()
    _check_latents([c for c in candidates if c.run is not None], unet, call, opts)
    return candidates


def _time_interleaved(candidates: list[_Candidate], opts: BenchOptions, label: str) -> None:
    """`opts.repeats` rounds, each running every runnable candidate once in turn: their times and peaks."""
    runnable = [c for c in candidates if c.run is not None]
    for _ in tqdm(range(opts.repeats), desc=f"interleaved repeats {label}"):
        for c in runnable:
            before = resident(opts.device)
            (_, seconds), top = peak_during(lambda: timed(c.run), opts.device)
            c.settings.setdefault("times", []).append(seconds)
            c.peaks.append(top - before)


def _check_latents(candidates: list[_Candidate], unet, call: dict, opts: BenchOptions) -> None:
    """Runs each candidate once (also its warm-up) and stores the relative max error of its latents against
    its eager reference in `settings["latent_error"]`."""
    eager = compile_deepcache(unet, branch=opts.branch)
    references = {}
    for c in candidates:
        if c.reference is None:
            continue
        if c.reference not in references:
            model = unet if c.reference == ("unet",) else eager.with_schedule(_schedule(opts, *c.reference[1:]))
            references[c.reference] = ddim_loop(model, call, opts.steps).float()
        expected = references[c.reference]
        with torch.no_grad():
            actual = c.run().float()
        c.settings["latent_error"] = ((actual - expected).abs().max() / expected.abs().max()).item()


def _schedule(opts: BenchOptions, kind: str, interval: int):
    total = opts.steps if kind == "nonuniform" else None
    return make_schedule(kind, interval, num_inference_steps=total, center=min(DEFAULT_CENTER, opts.steps // 3))


def _parameters(module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()])


def _built(device: str, build: Callable[[], Callable[[], None]]) -> tuple[Callable[[], None], int]:
    """`build()` (which compiles and runs once) and the resident bytes it added."""
    gc.collect()
    before = resident(device)
    run = build()
    gc.collect()
    return run, resident(device) - before


def _baselines(unet, call: dict, opts: BenchOptions, dtype: str) -> list[_Candidate]:
    """The eager U-Net (non-fp32 dtypes: the fp32 one is every run's reference row), the reference helper per
    interval and `torch.compile` of the U-Net, in that dtype. The helper runs once before the U-Net is compiled:
    enabling it patches the U-Net's module forwards, and a compiled U-Net first run before that would be
    recompiled (a guard on the modules' attributes) in the timed loop."""
    out = []
    settings = {"backend": "eager", "dtype": dtype}
    if "unet-eager" in opts.baselines and dtype != "fp32":
        out.append(_Candidate(f"unet-eager {dtype}", lambda: ddim_loop(unet, call, opts.steps), settings, opts.steps))
    if "reference-helper" in opts.baselines:
        for interval in opts.intervals:
            loop = _reference_helper(unet, opts.branch, interval, call, opts.steps)
            if loop is not None:
                loop()
                full = len(make_schedule("uniform", interval).full_steps(opts.steps))
                out.append(_Candidate(f"reference-helper {dtype} N={interval}", loop,
                                      {**settings, "schedule": "uniform", "interval": interval}, full,
                                      reference=("deepcache", "uniform", interval)))
    if "unet-compile" in opts.baselines:
        def build():
            compiled = torch.compile(unet)
            ddim_loop(compiled, call, opts.steps)  # compile, and warm up on the loop's own timesteps
            return lambda: ddim_loop(compiled, call, opts.steps)

        compiled = _guarded(f"unet-compile {dtype}", {"backend": "inductor", "dtype": dtype}, opts, build)
        compiled.reference = ("unet",)
        out.append(compiled)
    return out


def _int8_baselines(unet, call: dict, opts: BenchOptions, int8: Int8) -> list[_Candidate]:
    """The int8 model without DeepCache: the whole U-Net traced, quantized as the DeepCache graphs are (observed,
    calibrated on the same recorded calls, converted) and compiled with `torch.compile` (Inductor, freezing)."""
    def build():
        flatten = CallFlattener(unet)
        traced = trace_unet(unet, flatten((), call))
        observed = quantize.observe(traced.gm, int8.keep, int8.keep_input, int8.seven_bit)
        with torch.no_grad():
            for args, kwargs in int8.calls:
                observed(*flatten(args, kwargs).tensors)
        compiled = torch.compile(quantize.quantize(observed))
        loop = _FlatModel(compiled, flatten)
        ddim_loop(loop, call, opts.steps)
        return lambda: ddim_loop(loop, call, opts.steps)

    compiled = _guarded("unet-compile int8", {"backend": "inductor", "dtype": "int8"}, opts, build)
    compiled.reference = ("unet",)
    return [compiled]


class _FlatModel:
    """A traced model's graph (flat tensors in, `(sample,)` out) called as the model: `model(**call).sample`."""

    def __init__(self, graph, flatten: CallFlattener):
        self.graph, self.flatten = graph, flatten

    def __call__(self, *args, **kwargs):
        (sample,) = self.graph(*self.flatten(args, kwargs).tensors)
        return SimpleNamespace(sample=sample)


def _guarded(name: str, settings: dict, opts: BenchOptions, build, full_steps: int | None = None) -> _Candidate:
    """A candidate built by `build`, with the memory it added; a failed build becomes a row with its error."""
    try:
        run, held = _built(opts.device, build)
    except Exception as err:  # one backend that cannot run this dtype must not stop the others
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return _Candidate(name, None, {**settings, "error": message}, full_steps or opts.steps)
    return _Candidate(name, run, settings, full_steps or opts.steps, held=held)


def _deepcache_candidates(unet, call: dict, opts: BenchOptions, spec: str, dtype: str,
                          int8: Int8 | None = None) -> list[_Candidate]:
    """One candidate per schedule and interval, all sharing one compiled pair of backend `spec` (int8: calibrated
    on the first schedule's steps)."""
    backend, options = parse_backend(spec)
    state = {}

    def build():
        dc = compile_deepcache(unet, branch=opts.branch, backend=backend, backend_options=options, quantize=int8,
                               interval=opts.intervals[0] if int8 else None)
        pair = dc.prepare(**call)
        inputs = pair.traced.example_inputs
        with torch.no_grad():
            _, cache = pair.full(*inputs)
            state["graphs"] = (median_ms(lambda: pair.full(*inputs), opts.min_run_time),
                               median_ms(lambda: pair.shallow(*inputs, cache), opts.min_run_time))
        state["dc"] = dc
        return lambda: None

    first = _guarded(f"deepcache {spec} {dtype}", {"backend": spec, "dtype": dtype}, opts, build)
    if first.run is None:
        return [first]
    out = []
    for kind in opts.schedules:
        for interval in opts.intervals:
            try:
                schedule = _schedule(opts, kind, interval)
            except ValueError:  # no non-uniform schedule with ceil(T/N) full steps for this T and N
                continue
            candidate = state["dc"].with_schedule(schedule)
            out.append(_Candidate(
                f"deepcache {spec} {dtype} {kind} N={interval}",
                (lambda d: lambda: ddim_loop(d, call, opts.steps))(candidate),
                {"backend": spec, "dtype": dtype, "schedule": kind, "interval": interval},
                len(candidate.full_steps(opts.steps)), held=first.held, graphs=state["graphs"],
                reference=("deepcache", kind, interval)))
    return out


def _rows(candidates: list[_Candidate], macs: tuple[int, int], peaks: dict[str, float], parameters: int,
          opts: BenchOptions, dtype: str, with_base: bool = True) -> list[dict]:
    """One row per candidate; the first is the fp32 reference the ratios divide (its row left out where another
    dtype's rows already hold it: `with_base` False)."""
    full_macs, shallow_macs = macs
    base = median(candidates[0].settings["times"])
    helpers = {c.settings["interval"]: median(c.settings["times"]) for c in candidates
               if c.name.startswith("reference-helper") and c.run is not None}
    host = machine()
    fixed = {k: v for k, v in asdict(opts).items() if k not in ("intervals", "schedules", "backends", "dtypes",
                                                                 "baselines", "out")}
    rows = []
    for c in candidates if with_base else candidates[1:]:
        times = c.settings.get("times")
        settings = {k: v for k, v in c.settings.items() if k != "times"}
        row = {"name": c.name, **fixed, **settings, **host, "run_dtype": dtype}
        if times is None:
            rows.append(row)
            continue
        seconds, peak = median(times), peaks[c.settings["dtype"]]
        shallow = opts.steps - c.full_steps
        flops = 2 * (c.full_steps * full_macs + shallow * shallow_macs)
        uniform = c.settings.get("schedule") == "uniform" and c.settings.get("interval") in helpers
        row.update(median_s=seconds, min_s=min(times), max_s=max(times), full_steps=c.full_steps,
                   speedup_vs_unet_eager_fp32=base / seconds,
                   speedup_vs_reference_helper=helpers[c.settings["interval"]] / seconds if uniform else None,
                   gflop=flops / 1e9, matmul_peak_gflops=peak / 1e9, roofline_s=flops / peak,
                   roofline_fraction=flops / peak / seconds,
                   weights_gb=parameters * (1 if c.settings["dtype"] == "int8" else DTYPES[c.settings["dtype"]].itemsize) / _GB,
                   held_gb=c.held / _GB, peak_extra_gb=max(c.peaks) / _GB,
                   full_gmacs=full_macs / 1e9, shallow_gmacs=shallow_macs / 1e9,
                   mac_bound_speedup=mac_speedup(opts.steps, c.full_steps, shallow_macs / full_macs))
        if c.graphs:
            t_full, t_shallow = c.graphs
            row.update(full_ms=t_full, shallow_ms=t_shallow,
                       dispatch_efficiency=(c.full_steps * t_full + shallow * t_shallow) / 1e3 / seconds)
        rows.append(row)
    return rows


def fastest(rows: list[dict]) -> dict[str, dict]:
    """Per dtype, the row with the smallest median among the DeepCache rows that ran (the backends compared)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["name"].startswith("deepcache") and "median_s" in r and r["dtype"] == r["run_dtype"]:
            key = f"{r['dtype']} N={r.get('interval')}"
            if key not in best or r["median_s"] < best[key]["median_s"]:
                best[key] = r
    return best


def _write(rows: list[dict], opts: BenchOptions) -> None:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{opts.preset}_{opts.resolution}px_b{opts.batch}_branch{opts.branch}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2, default=str))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text(markdown_table(rows))
    _plot(rows, out / f"{stem}.png")


def markdown_table(rows: list[dict]) -> str:
    """One table per dtype run (its fp32 reference row first), then the fastest backend per dtype and N."""
    def fmt(v, spec, suffix=""):
        return "" if v is None else format(v, spec) + suffix

    lines = []
    for dtype in dict.fromkeys(r["run_dtype"] for r in rows):
        lines += [f"\n**{dtype}**\n",
                  "| configuration | median s (min-max) | vs eager fp32 | vs helper | roofline s | of roofline | "
                  "held GB | peak +GB | MAC bound | dispatch eff. | latents vs eager |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["run_dtype"] == dtype):
            if "median_s" not in r:
                lines.append(f"| {r['name']} | failed: {r.get('error', '')} | | | | | | | | | |")
                continue
            lines.append(
                f"| {r['name']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | "
                f"{r['speedup_vs_unet_eager_fp32']:.2f}x | {fmt(r.get('speedup_vs_reference_helper'), '.2f', 'x')} | "
                f"{fmt(r.get('roofline_s'), '.2f')} | {fmt(r.get('roofline_fraction'), '.0%')} | "
                f"{r['held_gb']:.2f} | {r['peak_extra_gb']:.2f} | {r['mac_bound_speedup']:.2f} | "
                f"{fmt(r.get('dispatch_efficiency'), '.2f')} | {fmt(r.get('latent_error'), '.1e')} |")
    best = fastest(rows)
    if best:
        lines += ["", "Fastest DeepCache backend (of the backends in this run):", ""]
        lines += [f"- {key}: {r['backend']}, {r['median_s']:.2f} s" for key, r in best.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for r in rows:
        if r.get("full_steps") is not None and "interval" in r and "median_s" in r and r["dtype"] == r["run_dtype"]:
            label = (f"{r['backend']} {r['dtype']} {r['schedule']}" if r["name"].startswith("deepcache")
                     else f"reference helper {r['dtype']}")
            series.setdefault(label, []).append((r["interval"], r["speedup_vs_unet_eager_fp32"]))
            if r.get("schedule") == "uniform":
                series.setdefault("MAC bound (uniform)", []).append((r["interval"], r["mac_bound_speedup"]))
    for label, points in series.items():
        points = sorted(set(points))
        ax.plot([p[0] for p in points], [p[1] for p in points], "k--" if "MAC" in label else "o-", label=label)
    ax.set_xlabel("interval N")
    ax.set_ylabel("speedup vs eager fp32 U-Net")
    ax.set_title(f"{rows[0]['preset']} {rows[0]['resolution']} px, batch {rows[0]['batch']}, branch {rows[0]['branch']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
