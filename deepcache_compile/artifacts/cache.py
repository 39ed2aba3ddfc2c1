"""A persistent cache of compiled graphs, shared by processes: a later process (a restarted server, a new replica)
loads what an earlier one compiled instead of compiling it again.

An entry is one compiled graph (an AOTInductor package) under a key that covers everything its code depends
on: the graph's code, the content of every weight it reads (SHA-256 of the bytes; each tensor hashed once per
process while it is unchanged), its input shapes, dtypes, strides and devices (or the symbolic ranges), the
backend and its options, the torch and deepcache_compile versions and the CPU's instruction sets (or the GPU).
A changed weight, option, shape or version is another key: a miss, never a stale hit.

Writes are atomic: an entry is written into a private temporary folder beside the entries and renamed into
place; of two processes that compile the same key at once, the first rename wins and the other's copy is
dropped. Each entry records its file's SHA-256; an entry whose file does not match (a torn copy, a disk error)
is removed and compiled again, never loaded. When the entries pass `max_bytes` the least recently used go.

Example:
    >>> dc = compile_deepcache(unet, branch=1, backend="aoti", cache_dir="~/.cache/deepcache")
    >>> # or DEEPCACHE_CACHE_DIR=~/.cache/deepcache in the environment
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from .manifest import cpu_isa, sha256

__all__ = ["CACHE_DIR_ENV", "CompileCache", "graph_key", "graph_tensors", "tensor_digest"]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "DEEPCACHE_CACHE_DIR"
DEFAULT_MAX_BYTES = 50 * 10**9
_ENTRY = "entry.json"

# tensor -> ((data_ptr, version, shape, stride), SHA-256 of its bytes): a tensor is hashed once while unchanged.
# Keyed by the tensor object's identity (weakly), so a new tensor that lands on a freed one's memory is never
# mistaken for it.
_DIGESTS = WeakIdKeyDictionary()
_DIGESTS_LOCK = threading.Lock()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's values (its dtype and shape included)."""
    state = (t.data_ptr(), t._version, tuple(t.shape), t.stride())
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(t)
    if known is not None and known[0] == state:
        return known[1]
    values = t.detach()
    digest = hashlib.sha256(f"{values.dtype}{tuple(values.shape)}".encode())
    if values.numel():
        digest.update(memoryview(values.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    with _DIGESTS_LOCK:
        _DIGESTS[t] = (state, digest.hexdigest())
    return digest.hexdigest()


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor a graph module reads by name: its parameters, buffers and `get_attr` constants."""
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers()),
            **{n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
               and isinstance(getattr(gm, n.target, None), torch.Tensor)}}


def graph_key(backend: str, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], options: dict,
              ranges=None) -> str:
    """The cache key of one graph compiled by `backend` (see the module docstring for what it covers)."""
    from .. import __version__

    tensors = sorted(graph_tensors(gm).items())
    device = inputs[0].device
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else sorted(cpu_isa()))
    material = {
        "backend": backend,
        "options": json.dumps(options, sort_keys=True, default=repr),
        "code": gm.code,
        "weights": [(name, tensor_digest(t)) for name, t in tensors],
        "inputs": [(tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) for t in inputs],
        "ranges": repr(ranges),
        "versions": (torch.__version__, __version__),
        "machine": machine,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass(frozen=True)
class CompileCache:
    """Compiled graphs on disk under `directory`, at most `max_bytes` in all (least recently used go first)."""

    directory: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def at(cls, directory: str | os.PathLike | None) -> "CompileCache | None":
        """The cache in `directory` (`~` expanded; created on first write), or None for no cache."""
        return None if directory in (None, "") else cls(Path(directory).expanduser())

    def get(self, key: str, name: str) -> Path | None:
        """The verified file `name` of entry `key`, or None (missing, or corrupt: then the entry is removed)."""
        folder = self._folder(key)
        try:
            record = json.loads((folder / _ENTRY).read_text())
            path = folder / name
            if sha256(path) != record["sha256"][name]:
                raise ValueError(f"{path} does not match its recorded SHA-256")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as err:
            logger.warning("compile cache: entry %s is corrupt (%s): removed, compiling again", key[:16], err)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.utime(folder)  # recently used: evicted last
        logger.info("compile cache: hit %s", key[:16])
        return path

    def put(self, key: str, name: str, write: Callable[[Path], object]) -> Path:
        """Runs `write(path)` into a private folder and moves it into place as entry `key`; returns the file in
        the cache (another process's, if it put the same key first)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=self.directory))
        try:
            write(tmp / name)
            (tmp / _ENTRY).write_text(json.dumps({"sha256": {name: sha256(tmp / name)}, "created": time.time()}))
            folder = self._folder(key)
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process renamed its copy into place first: keep theirs
                logger.info("compile cache: %s was written by another process meanwhile", key[:16])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict()
        return self._folder(key) / name

    def entries(self) -> list[tuple[Path, int, float]]:
        """(folder, bytes, last use) of every entry."""
        out = []
        for folder in self.directory.glob("??/*"):
            try:
                size = sum(f.stat().st_size for f in folder.iterdir())
                out.append((folder, size, folder.stat().st_mtime))
            except OSError:  # removed meanwhile
                continue
        return out

    def evict(self) -> None:
        """Removes the least recently used entries until the rest fit in `max_bytes`."""
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for folder, size, _ in entries:
            if total <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            logger.info("compile cache: evicted %s (%.1f MB) to stay within %.1f GB", folder.name[:16], size / 1e6,
                        self.max_bytes / 1e9)

    def _folder(self, key: str) -> Path:
        return self.directory / key[:2] / key
