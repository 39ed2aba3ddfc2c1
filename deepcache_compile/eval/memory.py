"""Resident memory as the benchmarks report it: what a configuration holds, and its peak while it runs.

CPU: the process's resident set (`/proc/self/statm`, after `malloc_trim` so that freed heap is not counted)
and its high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`, Linux >= 4.0). CUDA: the caching
allocator's `memory_allocated` / `max_memory_allocated` (memory that onnxruntime or TensorRT allocate
themselves is not in it: said so where it is reported).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable

import torch

__all__ = ["resident", "peak_during"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed heap may stay counted
        pass


def resident(device: torch.device | str = "cpu", trim: bool = True) -> int:
    """Bytes in use now: the resident set on CPU (with `trim=False`, counting freed heap that glibc kept, as the
    operating system sees it), the allocator's allocated bytes on CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    if trim:
        _trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_during(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """`(fn(), peak bytes in use while it ran)`: the high-water mark reset just before `fn`."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated()
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return result, hwm

