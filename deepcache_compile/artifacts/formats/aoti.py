"""`aoti`: AOTInductor packages, compiled for the export machine's device and torch version.

Loaded in Python with `torch._inductor.aoti_load_package`, or from C++ with `AOTIModelPackageLoader`. The loader
extracts the package when it opens it, so the package file may be removed afterwards (the `aoti` backend does).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import RANGES_KEY, ranges_text

SUFFIX = ".aoti.pt2"
TIED_TO = "torch"
WRITE_OPTIONS = ("inductor_configs",)
# Graph passes before export: "attention" ("auto" by default), bf16 attention on the project's CPU kernel.
GRAPH_OPTIONS = ("attention",)
LOAD_OPTIONS: tuple[str, ...] = ()


def package(program: torch.export.ExportedProgram, path: Path, inductor_configs: dict | None = None,
            weights: bool = True, metadata: dict[str, str] | None = None) -> Path:
    """Compiles `program` with AOTInductor into the package file `path`; with `weights=False` the package holds
    no weights (`load(..., constants=...)` binds them); `metadata` is stored in the package (the loader's
    get_metadata(), in Python and C++)."""
    configs = dict(inductor_configs or {})
    if metadata:
        configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), **metadata}
    if not weights:
        configs["aot_inductor.package_constants_in_so"] = False
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return path


def write(program: torch.export.ExportedProgram, path: Path, io, ranges, inductor_configs: dict | None = None,
          ) -> list[Path]:
    return [package(program, path, inductor_configs, metadata={RANGES_KEY: ranges_text(ranges)})]


def load(path: Path, device: torch.device, constants: dict[str, torch.Tensor] | None = None):
    """Loads an AOTInductor package: a callable `(*tensors) -> tuple[tensor, ...]`.

    `constants` (a package written with `weights=False`): the program's parameters, buffers and constants by
    name, which the graph then reads where they are (AOTInductor's user-managed constants: no copy). The callable
    keeps them alive, so a parameter replaced afterwards (`p.data = x`) leaves the graph on the old tensor.
    """
    device = torch.device(device)
    index = -1 if device.type == "cpu" else (device.index or 0)
    runner = torch._inductor.aoti_load_package(str(path), device_index=index)
    if constants is not None:
        runner.load_constants({name: constants[name] for name in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)

    def run(*tensors):
        return tuple(runner(*tensors))

    run.constants = constants  # what the graph reads: alive as long as the graph
    run.compiled_ranges = runner.get_metadata().get(RANGES_KEY, "")
    run.owns_weights = constants is None  # the package's constants: the U-Net's own tensors are not read
    return run
