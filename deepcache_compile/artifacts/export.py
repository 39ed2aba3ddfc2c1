"""A DeepCache U-Net -> engine files plus a manifest (`deepcache.json`) that deploy without the model's code.

One export serves every batch size and resolution in its declared ranges: the U-Net is traced once with
symbolic batch/height/width, cut at the branch, and each half exported again as its own program, so the
shallow artifact holds only the weights it uses. Each format (`formats/`) writes its own files:

- `pt2`: `torch.export.save` programs (torch alone loads them);
- `aoti`: AOTInductor packages (compiled for the export device; Python or C++ `AOTIModelPackageLoader`);
- `onnx`: ONNX with external data and dynamic batch/height/width (onnxruntime, TensorRT's parser);
- `tensorrt`: TensorRT engines (`.plan`) built from the ONNX files, one optimization profile (GPU only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ..calls import CallFlattener, FlatCall
from ..graph.passes import PassOptions, apply_passes
from ..graph.partition import cache_value, split_at_branch, split_three
from ..graph.step import device_step
from ..graph.trace import export_program
from ..kernels import native_ops
from ..options import check_options
from ..policy import StepState
from ..runtime.generation import keep_cache
from ..runtime.pair import dynamic_example, int8_split, select_branch, shape_ranges, trace_in_ranges
from ..schedule import nonuniform_full_steps
from ..shapes import ShapeRanges, TracedSizes, is_batched, size_exprs
from .formats import PartIO, get_format
from .manifest import FORMAT_VERSION, MANIFEST, cpu_isa, sha256
from .signing import SIGNATURE, sign_manifest

logger = logging.getLogger(__name__)

__all__ = ["export_deepcache"]

_IO = {"full": PartIO(outputs=("out_sample", "cache_out"), inputs=()),
       "shallow": PartIO(outputs=("out_sample",), inputs=("cache",))}
_FORECAST_INPUTS = ("slope", "steps")  # the shallow graph's extra inputs with forecast (graph.passes)


_STEP_IO = {"step": PartIO(outputs=("out_sample", "cache_out", "reference_out", "drift_out", "run_out", "full"),
                           inputs=("cache", "reference", "drift", "run", "mode"))}


def _three_io(links: int) -> dict[str, PartIO]:
    """Extra inputs and the outputs of the head, deep and tail graphs (an adaptive-refresh export)."""
    names = tuple(f"link{i}" for i in range(links))
    return {"head": PartIO(outputs=names, inputs=()), "deep": PartIO(outputs=("cache_out",), inputs=names),
            "tail": PartIO(outputs=("out_sample",), inputs=(*names, "cache"))}


def export_deepcache(dc, directory: str | Path, format: str = "pt2", *, example: dict | None = None,
                     batch: tuple[int, int] | None = None, height: tuple[int, int] | None = None,
                     width: tuple[int, int] | None = None, tokens: tuple[int, int] | None = None,
                     fp16: bool = False, options: dict | None = None, scheduler=None, sign_key=None) -> Path:
    """Writes the full/shallow pair of a `DeepCacheUNet` as engine files plus `deepcache.json`.

    Args:
        dc: the `DeepCacheUNet` (its U-Net, branch and schedule are exported).
        directory: where to write; created if missing.
        format: one of "pt2", "aoti", "onnx", "tensorrt".
        example: keyword arguments of one U-Net call; default: the last call the module saw.
        batch, height, width: (min, max) ranges to accept (`ShapeRanges.resolve`); height/width in U-Net input
            pixels. Defaults: batch 1..16, height/width 2*multiple .. max(2*sample_size, 8*multiple); a
            transformer's: its example's resolution (a range: latent pixels, multiples of its patch).
        tokens: for a transformer of packed tokens (Flux), the (min, max) token count (default: the example's).
        fp16: build TensorRT engines with fp16 kernels (the same as `options={"fp16": True}`).
        options: the format's write options (aoti: `inductor_configs`, and `attention`: "auto" (default),
            "native" or "sdpa", bf16 attention on the project's CPU kernel as for the aoti backend, recorded
            in the manifest's `native_ops`; tensorrt: `fp16`).
        scheduler: a diffusers scheduler whose config is written beside the engines (`scheduler_config.json`,
            verified like them), for generation loops outside Python (`deepcache-generate`).
        sign_key: an Ed25519 private key (PEM file, or a cryptography key) to sign the manifest with
            (`deepcache.json.sig`); loaders given `trusted_keys` refuse anything else (`signing`).

    Example:
        >>> dc = compile_deepcache(unet, branch=1, interval=5)
        >>> dc.export("engines/sd15-b1", format="onnx", example=call)
        >>> pipe.unet = load_deepcache("engines/sd15-b1")
    """
    writer = get_format(format)
    options = {**({"fp16": True} if fp16 else {}), **(options or {})}
    check_options(f"the {format} format", options, (*writer.WRITE_OPTIONS, *writer.GRAPH_OPTIONS))
    attention = options.pop("attention", "auto") if "attention" in writer.GRAPH_OPTIONS else None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    call = _example(dc, example)
    ranges = shape_ranges(dc.unet, call, "export", batch=batch, height=height, width=width,
                          **({"tokens": tokens} if tokens is not None else {}))
    programs, branch, probe, compiled, cache_shape = _dynamic_programs(dc, call, ranges, attention,
                                                                       f"the {format} export")
    # A model traced only from a larger batch: the engines pad smaller calls up to it (the manifest's pad_batch).
    pad_batch = compiled.batch[0] if compiled.batch[0] > ranges.batch[0] else 1
    ranges = compiled
    forecast = dc.deepcache_config.forecast
    parts = _STEP_IO if "step" in programs else _IO if probe is None else \
        _three_io(len(programs["head"].graph_signature.user_outputs))
    if forecast:
        parts = {**parts, "shallow": PartIO(outputs=parts["shallow"].outputs,
                                            inputs=parts["shallow"].inputs + _FORECAST_INPUTS)}
    files = {}
    for part, program in programs.items():
        io = PartIO(inputs=call.names + parts[part].inputs, outputs=parts[part].outputs)
        files[part] = writer.write(program, directory / f"{part}{writer.SUFFIX}", io, ranges, **options)
    if scheduler is not None:
        scheduler.save_config(directory)
        files["scheduler"] = [directory / "scheduler_config.json"]
    ops = sorted({op for program in programs.values() for op in native_ops(program.graph)})
    manifest = _manifest(dc, format, ranges, branch, files, call, ops, parts, probe, pad_batch, cache_shape)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    (directory / SIGNATURE).unlink(missing_ok=True)  # a signature from an earlier export here no longer applies
    if sign_key is not None:
        sign_manifest(directory, sign_key)
    logger.info("exported %s pair to %s: %s", format, directory, {k: [p.name for p in v] for k, v in files.items()})
    return directory


def _example(dc, example: dict | None) -> FlatCall:
    if example is not None:
        return dc.flatten((), example)
    if not dc.pairs:
        raise ValueError("nothing to export yet: pass example=<one U-Net call's keyword arguments>, or call the "
                         "module (or dc.prepare(**call)) once first")
    return dc.pairs[-1].traced.call


def _dynamic_programs(dc, call: FlatCall, ranges: ShapeRanges, attention: str, who: str):
    """The programs to write: full and shallow, or, for a policy that decides from the head's probe, head, deep
    and tail (and the probe's index among the head's outputs; None for a pair), or with split="step" the one
    step program (and its `StepState`); and the ranges they were compiled for (from batch 2 where the model traces
    only from there, `runtime.pair.trace_in_ranges`); and the cache's shape in words of the sample's."""
    call = dynamic_example(call, ranges)  # a batch-1 example would specialize the programs to batch 1
    traced, pad_batch = trace_in_ranges(dc.unet, call, ranges, dc.deepcache_config)
    if pad_batch > 1:
        ranges = dataclasses.replace(ranges, batch=(pad_batch, ranges.batch[1]))
    branch = select_branch(traced.gm, dc.deepcache_config)
    inputs = call.tensors
    sizes = TracedSizes.of(traced.gm)
    cache_shape = TracedSizes((*sizes.shapes, size_exprs(cache_value(traced.gm, branch).shape))).describe(len(inputs))

    forecast = dc.deepcache_config.forecast
    passes = PassOptions(forecast=forecast, attention=attention, who=who)

    def export(gm, part, tensors):
        return export_program(apply_passes(gm, part, passes), tensors, ranges)

    if dc.deepcache_config.graphs == "step":
        step = device_step(split_three(traced.gm, branch), dc.deepcache_config.policy, passes, len(inputs))
        return ({"step": export_program(step, step.example(*inputs), ranges, variadic=True)}, branch, step.state,
                ranges, cache_shape)
    if dc.deepcache_config.policy.uses_probe:
        three = split_three(traced.gm, branch)
        with torch.no_grad():
            links = three.head(*inputs)
            (cache,) = three.deep(*inputs, *links)
        programs = {"head": export(three.head, "head", inputs), "deep": export(three.deep, "deep", (*inputs, *links)),
                    "tail": export(three.tail, "tail", (*inputs, *links, cache))}
        return programs, branch, three.probe, ranges, cache_shape
    split = split_at_branch(traced.gm, branch)
    if dc.deepcache_config.quantize is not None:  # the int8 graphs, calibrated on the recorded calls in the ranges
        split = int8_split(dc.unet, split, call, dc.deepcache_config, ranges)
    with torch.no_grad():
        cache = split.full(*inputs)[1]
    extra = keep_cache(cache) if forecast else ()  # (slope, steps): zeros, 0 steps
    return ({"full": export(split.full, "full", inputs),
             "shallow": export(split.shallow, "shallow", (*inputs, cache, *extra))}, branch, None, ranges, cache_shape)


def _manifest(dc, format: str, ranges: ShapeRanges, branch, files: dict[str, list[Path]], call: FlatCall,
              ops: list[str], parts: dict[str, PartIO], probe: int | None, pad_batch: int, cache_shape: str) -> dict:
    import diffusers

    from .. import __version__

    unet = dc.unet
    sample = call.tensors[0]
    add_embedding = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    versions = {"deepcache_compile": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
    for module in ("onnx", "onnxruntime", "tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    config = dc.deepcache_config
    schedule = config.schedule
    return {
        "format_version": FORMAT_VERSION,
        "format": format,
        "branch": branch.index,
        "schedule": asdict(schedule),
        # Resolved here, so that runtimes in other languages need not redo the reference's complex arithmetic.
        "nonuniform_full_steps": list(nonuniform_full_steps(schedule.num_inference_steps, schedule.interval,
                                                            schedule.center, schedule.power))
        if schedule.kind == "nonuniform" else None,
        # A policy that decides from the head's probe (adaptive refresh) runs head -> [deep] -> tail: its
        # parameters, and the probe's index among the head's outputs.
        "policy": _policy(config, probe),
        # With forecast the shallow graph also takes (slope, steps): the cache's change per step between the last
        # two full steps, and the steps since the last one (runtime.generation.Extrapolation).
        "forecast": config.forecast,
        # int8 graphs (precision.Int8): weights per channel, activations calibrated on this many recorded calls.
        "int8": {"keep": list(config.quantize.keep), "keep_input": config.quantize.keep_input,
                 "seven_bit": config.quantize.seven_bit,
                 "calibration_calls": len(config.quantize.calls)}
        if config.quantize is not None else None,
        "calls_per_step": config.calls_per_step,
        # batched: the first dimension is the call's batch (shapes.py's rule; Flux's token ids are not).
        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "rank": t.dim(),
                    "batched": is_batched(t, call.tensors[0])} for n, t in zip(call.names, call.tensors)],
        "outputs": {part: list(io.outputs) for part, io in parts.items()},
        "ranges": {**asdict(ranges), "units": "U-Net input pixels"},
        # The engines were compiled from this batch (the model traces only from there); a call of fewer rows
        # runs with its rows repeated up to it and the output cut back (1: no padding).
        "pad_batch": pad_batch,
        "cache": _cache_rule(branch, sample, cache_shape),
        "unet": {"class": type(unet).__name__, "config": dict(unet.config), "dtype": str(sample.dtype),
                 "forward_params": list(CallFlattener(unet).parameters),
                 "add_embedding_in_features": add_embedding.in_features if add_embedding is not None else None},
        "versions": versions,
        "device": str(sample.device),
        "cpu_isa": sorted(cpu_isa()) if format == "aoti" and sample.device.type == "cpu" else None,
        # The project's own ops the engines call (kernels/: libdeepcache_kernels.so must be loaded to run them).
        "native_ops": ops,
        "scheduler": files["scheduler"][0].name if "scheduler" in files else None,
        "files": {part: [p.name for p in paths] for part, paths in files.items()},
        "sha256": {p.name: sha256(p) for paths in files.values() for p in paths},
        "sizes": {p.name: p.stat().st_size for paths in files.values() for p in paths},
    }


def _policy(config, probe) -> dict | None:
    """A probe policy's manifest entry: its rule, and the probe's index among the head's outputs (three graphs)
    or the state the step program carries (split="step": `decided` "device")."""
    if probe is None:
        return None
    if not isinstance(probe, StepState):
        return {"name": "adaptive", "threshold": config.policy.threshold, "max_skip": config.policy.max_skip,
                "probe": probe}
    rule = config.policy.device_rule()
    return {"name": "adaptive" if rule.accumulate else "first-block", "threshold": rule.threshold,
            "max_skip": rule.max_skip, "decided": "device", "state": probe.to_manifest()}


def _cache_rule(cut, sample: torch.Tensor, shape: str) -> dict:
    """The cached tensor's shape as a function of the sample's (`shape`, from the traced graph): a U-Net feature
    scales with the sample; a transformer residual's token count is the product of the patch rows and columns
    (the batch alone varies where the export serves one resolution)."""
    dtype = str(cut.cache_dtype).removeprefix("torch.")
    if len(cut.cache_shape) == 4:
        return {"channels": cut.cache_shape[1], "stride": sample.shape[-2] // cut.cache_shape[-2], "dtype": dtype,
                "shape": shape}
    return {"dtype": dtype, "shape": shape}
