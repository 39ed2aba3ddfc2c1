"""Bounds on oneDNN's primitive caches, for processes that serve many input shapes on the CPU.

PyTorch's CPU convolutions run through oneDNN, which keeps every primitive it creates (one per layer and input
shape) in two LRU caches of 1,024 entries each: oneDNN's own, shared by the process, and ideep's, one per
thread (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`). A server that meets many sizes and batch sizes
from a pool of threads fills all of them: measured with the digits model (`bench/onednn_caches.py`: 4 threads,
random batch 1..4 and sizes 8..24 px, 240 generations), resident memory grew 560 -> 688 MB with the defaults,
540 -> 550 MB with 64 entries and 551 -> 579 MB with 256 (flat after the first fifth), at the same speed. The
caches are bounded, not leaks, but 1,024 entries per thread is far more than one model at a few shapes needs.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["bound_onednn_caches", "DEFAULT_ENTRIES"]

DEFAULT_ENTRIES = 256
_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(entries: int = DEFAULT_ENTRIES) -> None:
    """Caps oneDNN's process-wide primitive cache and ideep's per-thread one at `entries` each.

    The caches read their capacity when they are created: call this before the process runs its first
    convolution (before loading a pipeline is early enough; `DeepCacheService` and `bench/soak.py` do it at
    start). Threads started later get the cap too. At least 1: ideep's cache with 0 entries crashes the process
    (a segmentation fault at the first convolution, torch 2.13); 1 is as good as off (every call creates its
    primitives again: 1.32x slower on the digits model).

    Example:
        >>> from deepcache_compile.runtime.onednn import bound_onednn_caches
        >>> bound_onednn_caches(256)   # then build the pipeline and serve
    """
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ValueError(f"entries={entries!r}: give the number of cached primitives, an int >= 1 (0 crashes "
                         f"ideep's cache; default {DEFAULT_ENTRIES})")
    for name in _VARIABLES:
        os.environ[name] = str(entries)
    logger.info("oneDNN primitive caches bounded at %d entries (process) and %d per thread", entries, entries)
