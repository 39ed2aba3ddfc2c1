"""Calls that arrive together from several threads, run as one batched call: the text encoders and the VAE
decoder of a text-to-image service, where each request's pipeline runs in its own thread.

`Coalescer(fn, window_s)` is called like `fn`. The first call of a quiet moment waits `window_s` for others,
then runs every call that arrived, grouped by what can share a batch (the same argument structure, constants
and per-row shapes), one `fn` call per group with the tensors concatenated along dimension 0, and hands each
caller its rows of the outputs. A call that fails fails every call of its group.

Example:
    >>> encode = Coalescer(pipe.text_encoder)
    >>> out = encode(ids, attention_mask=None)  # from many threads at once: one text-encoder call
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch.utils import _pytree as pytree

__all__ = ["Coalescer"]


@dataclass(eq=False)
class _Pending:
    args: tuple
    kwargs: dict
    rows: int
    key: Hashable
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Coalescer:
    """`fn` with concurrent calls batched along dimension 0 (see the module docstring). Counts `calls` (runs of
    `fn`) and `rows` (rows they carried)."""

    def __init__(self, fn: Callable, window_s: float = 0.005):
        self.fn, self.window_s = fn, window_s
        self.calls = 0
        self.rows = 0
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors or tensors[0].dim() == 0:
            return self.fn(*args, **kwargs)  # nothing to batch along
        rows = tensors[0].shape[0]
        key = (spec, tuple(_leaf_key(leaf, rows) for leaf in leaves))
        item = _Pending(args, kwargs, rows, key)
        with self._lock:
            lead = not self._pending
            self._pending.append(item)
        if lead:  # wait for the calls that arrive with this one, then run them all
            time.sleep(self.window_s)
            with self._lock:
                batch, self._pending = self._pending, []
            self._run(batch)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _run(self, batch: list[_Pending]) -> None:
        groups: dict[Hashable, list[_Pending]] = {}
        for item in batch:
            groups.setdefault(item.key, []).append(item)
        for items in groups.values():
            try:
                self._run_group(items)
            except BaseException as err:  # every caller of the group gets the error
                for item in items:
                    item.error = err
            for item in items:
                item.done.set()

    def _run_group(self, items: list[_Pending]) -> None:
        rows = [item.rows for item in items]
        columns = [pytree.tree_flatten((item.args, item.kwargs))[0] for item in items]
        leaves = [torch.cat([c[i] for c in columns]) if _batched(leaf, rows[0]) else leaf
                  for i, leaf in enumerate(columns[0])]
        args, kwargs = pytree.tree_unflatten(leaves, pytree.tree_structure((items[0].args, items[0].kwargs)))
        out = self.fn(*args, **kwargs)
        self.calls += 1
        self.rows += sum(rows)
        out_leaves, out_spec = pytree.tree_flatten(out)
        parts = [t.split(rows) if _batched(t, sum(rows)) else [t] * len(items) for t in out_leaves]
        for i, item in enumerate(items):
            item.result = pytree.tree_unflatten([p[i] for p in parts], out_spec)


def _batched(leaf: Any, rows: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == rows


def _leaf_key(leaf: Any, rows: int) -> Hashable:
    if _batched(leaf, rows):
        return "rows", tuple(leaf.shape[1:]), leaf.dtype, leaf.device
    if isinstance(leaf, torch.Tensor):
        return "tensor", id(leaf)  # no batch dimension: shared only by callers passing this very tensor
    try:
        hash(leaf)
        return "constant", leaf
    except TypeError:
        return "object", id(leaf)
