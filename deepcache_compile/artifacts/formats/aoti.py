"""`aoti`: AOTInductor packages, compiled for the export machine's device and torch version.

Loaded in Python with `torch._inductor.aoti_load_package`, or from C++ with `AOTIModelPackageLoader`. That loader
extracts the package's model library (weights included: 3.4 GB for SD 1.5) into a new temporary folder every time
it opens it, which is most of a load: on the CPU, `load` instead keeps the library unpacked once per package file
(`unpacked_library`) and opens it with AOTInductor's model runner, which maps it in place (SD 1.5 here: 3.9 s
instead of 9.8 s). The package file may be removed after a load (the `aoti` backend does).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch.fx.experimental import _config as fx_config

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
    # As the program was exported (graph.trace.export_program): equal example sizes must not become a guard.
    # Inductor re-traces views, and a view of a (2, h, w) grid as (2, 1, w, h) (diffusers' position tables)
    # would otherwise equate h and w at a square example, and the package would serve square sizes only.
    with fx_config.patch(backed_size_oblivious=True):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return path


def write(program: torch.export.ExportedProgram, path: Path, io, ranges, inductor_configs: dict | None = None,
          ) -> list[Path]:
    return [package(program, path, inductor_configs, metadata={RANGES_KEY: ranges_text(ranges)})]


def load(path: Path, device: torch.device, constants: dict[str, torch.Tensor] | None = None, unpack: bool = True):
    """Loads an AOTInductor package: a callable `(*tensors) -> tuple[tensor, ...]`.

    `constants` (a package written with `weights=False`): the program's parameters, buffers and constants by
    name, which the graph then reads where they are (AOTInductor's user-managed constants: no copy). The callable
    keeps them alive, so a parameter replaced afterwards (`p.data = x`) leaves the graph on the old tensor.
    `unpack`: on the CPU without `constants`, run the library unpacked once per package (`unpacked_library`); pass
    False for a package that is about to be deleted.
    """
    device = torch.device(device)
    unpacked = unpacked_library(path) if unpack and constants is None and device.type == "cpu" else None
    if unpacked is not None:
        library, metadata = unpacked
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)

        def run(*tensors):
            return tuple(runner.run(list(tensors)))

        run.compiled_ranges = metadata.get(RANGES_KEY, "")
    else:
        index = -1 if device.type == "cpu" else (device.index or 0)
        package = torch._inductor.aoti_load_package(str(path), device_index=index)
        if constants is not None:
            package.load_constants({name: constants[name] for name in package.get_constant_fqns()},
                                   check_full_update=True, user_managed=True)

        def run(*tensors):
            return tuple(package(*tensors))

        run.compiled_ranges = package.get_metadata().get(RANGES_KEY, "")
    run.constants = constants  # what the graph reads: alive as long as the graph
    run.owns_weights = constants is None  # the package's constants: the U-Net's own tensors are not read
    return run


def unpacked_library(path: Path) -> tuple[Path, dict[str, str]] | None:
    """The model library of package `path` and its metadata, unpacked once per package file (path, inode, size and
    modification time) under Inductor's cache folder (`deepcache_unpacked/`), or None for a package of several
    libraries (the package loader opens those). Unpacking is atomic: a folder is filled, then renamed into place.
    A library that calls custom ops (the project's attention kernel) has its extern-kernel file beside it
    (`model.json`), from which the model runner builds the proxy executor that calls them."""
    path = Path(path).resolve()
    stat = path.stat()
    layout = 2  # 2: with the extern-kernel file (folders of the first layout lacked it)
    key = hashlib.sha256(f"{layout}:{path}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    root = _inductor_cache_dir() / "deepcache_unpacked"
    folder = root / key
    if not folder.is_dir():
        with zipfile.ZipFile(path) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if len(libraries) != 1:
                return None
            library = libraries[0]
            stem = library.removesuffix(".so")
            members = [(library, "model.so"), (stem + "_metadata.json", "metadata.json")]
            if stem + ".json" in archive.namelist():  # custom ops: the runner reads model.json beside model.so
                members.append((stem + ".json", "model.json"))
            root.mkdir(parents=True, exist_ok=True)
            filling = Path(tempfile.mkdtemp(dir=root, prefix=".unpacking-"))
            try:
                for member, name in members:
                    with archive.open(member) as source, open(filling / name, "wb") as target:
                        shutil.copyfileobj(source, target, 64 << 20)
                os.rename(filling, folder)
            except OSError:
                if not folder.is_dir():  # not another process's rename winning the race
                    raise
            finally:
                shutil.rmtree(filling, ignore_errors=True)
    return folder / "model.so", json.loads((folder / "metadata.json").read_text())


def _inductor_cache_dir() -> Path:
    """Inductor's cache folder as `torch._inductor.runtime.cache_dir_utils.cache_dir` places it (importing that
    module imports Inductor and Dynamo: 3 s here, which a process that only loads engines need not pay)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
