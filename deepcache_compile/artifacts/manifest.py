"""`deepcache.json`: what an export holds and accepts, and its verification before anything is loaded.

The manifest records the format version, the format, the branch and schedule, the inputs, the accepted
`ShapeRanges`, the cached tensor's shape rule, the source U-Net's config, library versions, the project's own
kernels the engines call (`native_ops`), and every file's size and SHA-256. `read_manifest` checks all of it
(the same checks the native runtime makes) and raises `ManifestError` naming the file and the fix;
`check_native_ops` loads the kernels, before the engines are loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from ..kernels import native_op_missing
from ..shapes import ShapeRanges
from .formats import available_formats, get_format, ranges_text

__all__ = ["FORMAT_VERSION", "MANIFEST", "ManifestError", "ShapeRanges", "check_compiled_ranges", "check_native_ops",
           "cpu_isa", "read_manifest", "sha256"]

FORMAT_VERSION = 2  # 2: every engine file holds the shape ranges it was compiled for
MANIFEST = "deepcache.json"
# CPU instruction sets that compiled CPU kernels (AOTInductor, oneDNN) may be built for.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


class ManifestError(ValueError):
    """An engine directory is incomplete, tampered with, or made for another version."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_isa() -> set[str]:
    """The `ISA_FLAGS` this CPU has (Linux `/proc/cpuinfo`; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return set(flags) & set(ISA_FLAGS)


def read_manifest(directory: str | Path, data: bytes | None = None) -> dict:
    """Reads and verifies `deepcache.json` and the files it lists; raises ManifestError naming the problem.

    `data`: the manifest's bytes where the caller read them already (after verifying their signature,
    `signing.verified_manifest_bytes`): parsed instead of the file, so what was verified is what is used.

    Example:
        >>> read_manifest("engines/sd15-b1")["format"]
        'onnx'
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if data is None and not path.is_file():
        raise ManifestError(f"{path} is missing: not a deepcache_compile export (see dc.export)")
    try:
        manifest = json.loads(path.read_bytes() if data is None else data)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON ({err}): the manifest is damaged; export again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version={manifest.get('format_version')!r}; this deepcache_compile "
                            f"reads version {FORMAT_VERSION}: export again with this version")
    if manifest.get("format") not in available_formats():
        raise ManifestError(f"{path} has format={manifest.get('format')!r}; known formats are {available_formats()}")
    _check_versions(manifest, path)
    _check_isa(manifest, path)
    for name, digest in manifest["sha256"].items():
        _check_file(directory / name, manifest["sizes"][name], digest)
    return manifest


def check_native_ops(manifest: dict, directory: str | Path) -> None:
    """Loads the project's kernels the engines call (the manifest's `native_ops`), or raises ManifestError saying
    why one cannot run here (the C++ runtime's check and message, kernels/engine.cpp)."""
    for op in manifest.get("native_ops") or ():
        missing = native_op_missing(op)
        if missing is not None:
            raise ManifestError(f"{directory}: the engines call {op}, which cannot run here: {missing}; export again "
                                "with options={'attention': 'sdpa'} for machines without it")


def check_compiled_ranges(manifest: dict, file: Path, compiled: str | None) -> None:
    """Refuses a manifest whose ranges differ from those compiled into `file` (`compiled`, the file's own
    `ranges_text`; None where the format checks shapes itself): editing deepcache.json cannot widen what the
    engines accept. The C++ runtime makes the same check with the same message (kernels/engine.cpp)."""
    declared = ranges_text(manifest["ranges"])
    if compiled is not None and compiled != declared:
        raise ManifestError(f"{file}: compiled for the ranges {compiled or '(none)'}, {MANIFEST} declares {declared}: the "
                            "manifest was edited after export; export again")


def _check_versions(manifest: dict, path: Path) -> None:
    library = get_format(manifest["format"]).TIED_TO
    if library is None:
        return
    built, installed = manifest["versions"].get(library), importlib.import_module(library).__version__
    if built != installed:
        raise ManifestError(f"{path}: {manifest['format']} files were built with {library} {built}, this is "
                            f"{installed}: export again with this version")


def _check_isa(manifest: dict, path: Path) -> None:
    here = cpu_isa()
    missing = sorted(set(manifest.get("cpu_isa") or ()) - here) if here else []
    if missing:
        raise ManifestError(f"{path}: the engines were compiled for a CPU with {missing}, which this CPU lacks: "
                            "export again on this machine (or on one with the same instruction sets)")


def _check_file(file: Path, size: int, digest: str) -> None:
    if not file.is_file():
        raise ManifestError(f"{file} is missing: copy the whole export directory")
    if file.stat().st_size != size:
        raise ManifestError(f"{file} has {file.stat().st_size} bytes, the manifest says {size}: the file is "
                            "truncated or replaced")
    if sha256(file) != digest:
        raise ManifestError(f"{file} does not match its sha256 in the manifest: the file was modified")
