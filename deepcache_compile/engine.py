"""Engine files + manifest -> a DeepCache U-Net that runs without diffusers' model code.

`load_deepcache` verifies the manifest (format version, the library versions a format is tied to, every
file's size and sha256) before it opens anything, then loads the pair with the format's own runtime: torch
alone for `.pt2`, torch's AOTInductor loader for `.aoti.pt2`, onnxruntime for ONNX, TensorRT for `.plan`.
`DeepCacheEngine` has the call interface and schedule of `DeepCacheUNet` and reuses its dispatch logic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .dispatch import GenerationState, run_step
from .export import FORMAT_VERSION, MANIFEST, ShapeRanges, sha256
from .schedule import Schedule
from .trace import FlatCall

logger = logging.getLogger(__name__)

__all__ = ["load_deepcache", "DeepCacheEngine", "EngineOutput", "ManifestError"]


class ManifestError(ValueError):
    """An engine directory is incomplete, tampered with, or made for another version."""


@dataclass
class EngineOutput:
    """The U-Net output: `.sample`, like diffusers' `UNet2DConditionOutput`."""

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


class EngineConfig(dict):
    """The source U-Net's config, readable as attributes (`config.in_channels`) like diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the exported U-Net's config has no {name!r}") from None


def read_manifest(directory: str | Path) -> dict:
    """Reads and verifies `deepcache.json` and the files it lists; raises ManifestError naming the problem."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: not a deepcache_compile export (see dc.export)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON ({err}): the manifest is damaged; export again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version={manifest.get('format_version')!r}; this deepcache_compile "
                            f"reads version {FORMAT_VERSION}: export again with this version")
    _check_versions(manifest, path)
    for name, digest in manifest["sha256"].items():
        file = directory / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing: copy the whole export directory")
        if file.stat().st_size != manifest["sizes"][name]:
            raise ManifestError(f"{file} has {file.stat().st_size} bytes, the manifest says "
                                f"{manifest['sizes'][name]}: the file is truncated or replaced")
        if sha256(file) != digest:
            raise ManifestError(f"{file} does not match its sha256 in the manifest: the file was modified")
    return manifest


def _check_versions(manifest: dict, path: Path) -> None:
    versions = manifest["versions"]
    tied = {"aoti": ("torch", torch.__version__)}
    if manifest["format"] == "tensorrt":
        import tensorrt

        tied["tensorrt"] = ("tensorrt", tensorrt.__version__)
    if manifest["format"] in tied:
        library, installed = tied[manifest["format"]]
        if versions.get(library) != installed:
            raise ManifestError(f"{path}: {manifest['format']} files were built with {library} "
                                f"{versions.get(library)}, this is {installed}: export again with this version")


def _runners(manifest: dict, directory: Path, device: torch.device, provider: str | None):
    files = {part: directory / names[0] for part, names in manifest["files"].items()}
    fmt = manifest["format"]
    if fmt == "pt2":
        return tuple(_pt2(files[p], device) for p in ("full", "shallow"))
    if fmt == "aoti":
        from .backends import aoti

        loaded = [aoti.load(files[p], device) for p in ("full", "shallow")]
        return tuple((lambda m: lambda *t: tuple(m(*t)))(m) for m in loaded)
    if fmt == "onnx":
        from .backends.onnxruntime import OrtRunner

        providers = [provider] if provider else None
        return tuple(OrtRunner(files[p], device, providers) for p in ("full", "shallow"))
    from .backends.tensorrt import TrtRunner

    return tuple(TrtRunner(files[p].read_bytes(), device) for p in ("full", "shallow"))


def _pt2(path: Path, device: torch.device):
    module = torch.export.load(str(path)).module()
    module.to(device)
    return module


def load_deepcache(directory: str | Path, device: str | torch.device = "cpu", provider: str | None = None,
                   ) -> "DeepCacheEngine":
    """Loads an export written by `dc.export(directory, format=...)`.

    Args:
        directory: the export directory (with `deepcache.json`).
        device: where to run ("cpu", "cuda", "cuda:1").
        provider: for ONNX, the onnxruntime execution provider (e.g. "CUDAExecutionProvider").

    Example:
        >>> pipe.unet = load_deepcache("engines/sd15-b1", device="cuda")
        >>> image = pipe(prompt).images[0]
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    full, shallow = _runners(manifest, directory, torch.device(device), provider)
    return DeepCacheEngine(manifest, full, shallow, torch.device(device))


class DeepCacheEngine(nn.Module):
    """A loaded DeepCache pair with the U-Net's call interface and the exported schedule.

    Example:
        >>> engine = load_deepcache("engines/sd15-b1")
        >>> out = engine(latents, t, encoder_hidden_states=text).sample
    """

    def __init__(self, manifest: dict, full, shallow, device: torch.device):
        super().__init__()
        self.manifest = manifest
        self._full, self._shallow, self._device = full, shallow, device
        self.schedule = Schedule(**{**manifest["schedule"], "steps": tuple(manifest["schedule"]["steps"])})
        self.config = EngineConfig(manifest["unet"]["config"])
        self.ranges = ShapeRanges(**{k: (tuple(v) if isinstance(v, list) else v)
                                     for k, v in manifest["ranges"].items() if k != "units"})
        self._inputs = [(i["name"], getattr(torch, i["dtype"]), i["rank"]) for i in manifest["inputs"]]
        self._params = manifest["unet"]["forward_params"]
        self._known = frozenset(name.split(".")[0] for name, _, _ in self._inputs)
        self._state = GenerationState(manifest["calls_per_step"])
        self._checked: set = set()
        features = manifest["unet"]["add_embedding_in_features"]
        if features is not None:  # SDXL pipelines read unet.add_embedding.linear_1.in_features
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=features))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["unet"]["dtype"].removeprefix("torch."))

    @property
    def device(self) -> torch.device:
        return self._device

    def reset(self) -> None:
        """The next call starts a new generation (a full step)."""
        self._state.reset()

    def full_steps(self, total: int | None = None) -> list[int]:
        return self.schedule.full_steps(total)

    def forward(self, *args, return_dict: bool = True, **kwargs):
        given = dict(zip(self._params, args), **kwargs)
        tensors = self._flatten(given)
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if signature not in self._checked:
            self.ranges.check(tuple(tensors[0].shape))
            self._checked.add(signature)
        call = FlatCall(signature, tensors, given.get("timestep"), return_dict)
        sample = run_step(self._state, self.schedule, call, self._full, self._shallow)
        return EngineOutput(sample) if return_dict else (sample,)

    def _flatten(self, given: dict) -> tuple[torch.Tensor, ...]:
        tensors = []
        for name, dtype, rank in self._inputs:
            value = _lookup(given, name)
            if value is None:
                raise ValueError(f"input {name!r} is missing: this export was traced with inputs "
                                 f"{[n for n, _, _ in self._inputs]}")
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=dtype, device=self._device)
            if value.dim() != rank:
                value = value.reshape(-1)[:1].reshape(()) if rank == 0 else value.expand(given["sample"].shape[0])
            tensors.append(value.to(device=self._device, dtype=dtype))
        _refuse_extra(given, self._known)
        return tuple(tensors)


def _lookup(given: dict, name: str):
    value: Any = given
    for key in name.split("."):
        if value is None:
            return None
        value = value[int(key)] if isinstance(value, (list, tuple)) else value.get(key)
    return value


def _refuse_extra(given: dict, known: set[str]) -> None:
    extra = [k for k, v in given.items() if v is not None and k not in known and not (isinstance(v, dict) and not v)]
    if extra:
        raise ValueError(f"inputs {extra} were not part of the exported call: export again with them, or drop them")
