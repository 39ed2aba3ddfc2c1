"""A DeepCache U-Net -> engine files plus a manifest (`deepcache.json`) that deploy without the model's code.

One export serves every batch size and resolution in its declared ranges: the U-Net is traced once with
symbolic batch/height/width, cut at the branch, and each half exported again as its own program, so the
shallow artifact holds only the weights it uses. Formats:

- `pt2`: `torch.export.save` programs (torch alone loads them);
- `aoti`: AOTInductor packages (compiled for the export device; Python or C++ `AOTIModelPackageLoader`);
- `onnx`: ONNX with external data and dynamic batch/height/width (onnxruntime, TensorRT's parser);
- `tensorrt`: TensorRT engines (`.plan`) built from the ONNX files, one optimization profile (GPU only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .branches import find_branches
from .pair import select_branch
from .partition import split_at_branch
from .trace import CallFlattener, FlatCall, dynamic_dims, export_program, trace_unet

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "FORMAT_VERSION", "MANIFEST", "ShapeRanges", "export_deepcache", "sha256"]

FORMAT_VERSION = 1
FORMATS = ("pt2", "aoti", "onnx", "tensorrt")
MANIFEST = "deepcache.json"


@dataclass(frozen=True)
class ShapeRanges:
    """What an export accepts, in U-Net input pixels (latents for latent diffusion; x8 for SD's VAE).

    Attributes:
        batch: (min, max) batch size, counting the CFG doubling.
        height: (min, max) sample height; must be a multiple of `multiple`.
        width: (min, max) sample width; must be a multiple of `multiple`.
        multiple: the U-Net's total downsampling factor (8 for SD 1.x/2.x, 4 for SDXL).
    """

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int

    def check(self, shape: tuple[int, ...]) -> None:
        """Raises ValueError naming the dimension if a sample of `shape` is outside the ranges."""
        for what, value, (lo, hi) in (("batch", shape[0], self.batch), ("height", shape[-2], self.height),
                                      ("width", shape[-1], self.width)):
            if not lo <= value <= hi:
                raise ValueError(f"sample {what}={value} is outside this export's range {lo}..{hi}: export again "
                                 f"with {what}=({min(lo, value)}, {max(hi, value)})")
            if what != "batch" and value % self.multiple:
                raise ValueError(f"sample {what}={value} is not a multiple of {self.multiple}, which this export "
                                 f"needs (the U-Net downsamples by {self.multiple}): pad or resize the input")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_deepcache(dc, directory: str | Path, format: str = "pt2", *, example: dict | None = None,
                     batch: tuple[int, int] = (1, 16), height: tuple[int, int] | None = None,
                     width: tuple[int, int] | None = None, fp16: bool = False) -> Path:
    """Writes the full/shallow pair of a `DeepCacheUNet` as engine files plus `deepcache.json`.

    Args:
        dc: the `DeepCacheUNet` (its U-Net, branch and schedule are exported).
        directory: where to write; created if missing.
        format: one of "pt2", "aoti", "onnx", "tensorrt".
        example: keyword arguments of one U-Net call; default: the last call the module saw.
        batch, height, width: (min, max) ranges to accept; height/width in U-Net input pixels, defaulting to
            2*multiple .. 2*config.sample_size.
        fp16: build TensorRT engines with fp16 kernels.

    Example:
        >>> dc = compile_deepcache(unet, branch=1, interval=5)
        >>> dc.export("engines/sd15-b1", format="onnx", example=call)
        >>> pipe.unet = load_deepcache("engines/sd15-b1")
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: choose one of {FORMATS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    call, names = _example(dc, example)
    ranges = _ranges(dc.unet, call, names, batch, height, width)
    programs, branch = _dynamic_programs(dc, call, names, ranges)
    files = {part: _write(format, part, program, directory, names, ranges, call, fp16)
             for part, program in programs.items()}
    manifest = _manifest(dc, format, names, ranges, branch, files, directory, call)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    logger.info("exported %s pair to %s: %s", format, directory, {k: [p.name for p in v] for k, v in files.items()})
    return directory


def _example(dc, example: dict | None) -> tuple[FlatCall, tuple[str, ...]]:
    flatten = CallFlattener(dc.unet)
    if example is not None:
        return flatten((), example), flatten.input_names((), example)
    if not dc._pairs:
        raise ValueError("nothing to export yet: pass example=<one U-Net call's keyword arguments>, or call the "
                         "module (or dc.prepare(**call)) once first")
    traced = next(reversed(dc._pairs.values())).traced
    return traced.call, traced.input_names


def _ranges(unet, call: FlatCall, names, batch, height, width) -> ShapeRanges:
    traced = trace_unet(unet, call, names)
    sample_h = call.tensors[0].shape[-2]
    multiple = sample_h // min(b.cache_shape[-2] for b in find_branches(traced.gm))
    size = unet.config.sample_size
    size = size if isinstance(size, int) else max(size)
    default = (2 * multiple, max(2 * size, 8 * multiple))
    ranges = ShapeRanges(tuple(batch), tuple(height or default), tuple(width or default), multiple)
    for what, (lo, hi) in (("height", ranges.height), ("width", ranges.width)):
        if not (2 * multiple <= lo and hi // multiple > lo // multiple):
            raise ValueError(f"{what}=({lo}, {hi}) is not a usable range: it needs 2*{multiple} <= min and at "
                             f"least two multiples of {multiple} (e.g. {what}=({2 * multiple}, {8 * multiple}))")
    if not 1 <= ranges.batch[0] < ranges.batch[1]:
        raise ValueError(f"batch={ranges.batch} is not a usable range: use (min, max) with 1 <= min < max")
    return ranges


def _dynamic_programs(dc, call: FlatCall, names, ranges: ShapeRanges):
    r = (ranges.batch, ranges.height, ranges.width, ranges.multiple)
    traced = trace_unet(dc.unet, call, names, dynamic_shapes=dynamic_dims(call.tensors, *r))
    branch = select_branch(find_branches(traced.gm), dc.deepcache_config.branch)
    split = split_at_branch(traced.gm, branch)
    inputs = call.tensors
    with torch.no_grad():
        cache = split.full(*inputs)[1]
    full = export_program(split.full, inputs, dynamic_dims(inputs, *r))
    shallow = export_program(split.shallow, (*inputs, cache), dynamic_dims((*inputs, cache), *r))
    return {"full": full, "shallow": shallow}, branch


def _write(format: str, part: str, program, directory: Path, names, ranges: ShapeRanges, call: FlatCall,
           fp16: bool) -> list[Path]:
    in_names = list(names) + (["cache"] if part == "shallow" else [])
    out_names = ["out_sample", "cache_out"] if part == "full" else ["out_sample"]
    if format == "pt2":
        path = directory / f"{part}.pt2"
        torch.export.save(program, str(path))
        return [path]
    if format == "aoti":
        from .backends import aoti

        return [aoti.package(program, directory / f"{part}.aoti.pt2")]
    from .backends.onnxruntime import export_onnx

    if format == "onnx":
        return export_onnx(program, directory / f"{part}.onnx", in_names, out_names)
    from .backends.tensorrt import build_engine

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / f"{part}.onnx"
        export_onnx(program, onnx_path, in_names, out_names)
        plan = build_engine(onnx_path, _trt_profile(program, in_names, ranges, call), fp16=fp16)
    path = directory / f"{part}.plan"
    path.write_bytes(plan)
    return [path]


def _trt_profile(program, in_names, ranges: ShapeRanges, call: FlatCall) -> dict:
    """(min, opt, max) shapes per dynamic input: opt is the example; batch and spatial sizes scale with it."""
    example = [p.meta["val"] for p in program.graph.nodes if p.op == "placeholder"][-len(in_names):]
    sample = call.tensors[0]
    profile = {}
    for name, val in zip(in_names, example):
        opt = tuple(int(s) if not isinstance(s, torch.SymInt) else int(s.node.hint) for s in val.shape)
        if opt == () or not any(isinstance(s, torch.SymInt) for s in val.shape):
            continue
        lo, hi = list(opt), list(opt)
        if len(opt) >= 1 and opt[0] == sample.shape[0]:
            lo[0], hi[0] = ranges.batch
        if len(opt) >= 4:
            for dim, (a, b) in ((-2, ranges.height), (-1, ranges.width)):
                scale = opt[dim] / sample.shape[dim]
                lo[dim], hi[dim] = max(1, int(a * scale)), int(b * scale)
        profile[name] = (tuple(lo), opt, tuple(hi))
    return profile


def _manifest(dc, format: str, names, ranges: ShapeRanges, branch, files, directory: Path, call: FlatCall) -> dict:
    import diffusers

    from . import __version__

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
    return {
        "format_version": FORMAT_VERSION,
        "format": format,
        "branch": branch.index,
        "schedule": asdict(config.schedule),
        "calls_per_step": config.calls_per_step,
        "inputs": [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "rank": t.dim()}
                   for n, t in zip(names, call.tensors)],
        "outputs": {"full": ["out_sample", "cache_out"], "shallow": ["out_sample"]},
        "ranges": {**asdict(ranges), "units": "U-Net input pixels"},
        "cache": {"channels": branch.cache_shape[1], "stride": sample.shape[-2] // branch.cache_shape[-2],
                  "dtype": str(branch.cache_dtype).removeprefix("torch."),
                  "shape": "[batch, channels, height // stride, width // stride]"},
        "unet": {"class": type(unet).__name__, "config": dict(unet.config), "dtype": str(sample.dtype),
                 "forward_params": list(CallFlattener(unet)._signature.parameters),
                 "add_embedding_in_features": add_embedding.in_features if add_embedding is not None else None},
        "versions": versions,
        "device": str(sample.device),
        "files": {part: [p.name for p in paths] for part, paths in files.items()},
        "sha256": {p.name: sha256(p) for paths in files.values() for p in paths},
        "sizes": {p.name: p.stat().st_size for paths in files.values() for p in paths},
    }
