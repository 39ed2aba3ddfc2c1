"""The process-wide gate between `torch.export` traces and running denoising steps.

While it traces, `torch.export` turns oneDNN, NNPACK and cuDNN off for the whole process
(`torch.export._trace._ignore_backend_decomps`) and back on when it is done. A step running in another thread
at that moment silently uses other kernels: other rounding on a CPU (measured: a generation differed by 1e-5
from its run alone when a new shape was traced beside it), no cuDNN on a GPU. Two traces at once would also
undo each other's flags. So traces run one at a time and only while no step runs: `gate.trace()` waits for the
steps under way to finish and holds new ones back (a waiting trace goes first); `gate.step()` costs a lock
round trip per step (about a microsecond), nothing else.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["GATE", "TraceGate"]


class TraceGate:
    """Steps share it; a trace holds it alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._steps = 0
        self._traces = 0  # waiting or running
        self._one_trace = threading.RLock()  # re-entrant: a trace may export again inside (split halves)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._cond:
            while self._traces:
                self._cond.wait()
            self._steps += 1
        try:
            yield
        finally:
            with self._cond:
                self._steps -= 1
                if not self._steps:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def trace(self) -> Iterator[None]:
        with self._cond:
            self._traces += 1
        try:
            with self._one_trace:
                with self._cond:
                    while self._steps:
                        self._cond.wait()
                yield
        finally:
            with self._cond:
                self._traces -= 1
                self._cond.notify_all()


GATE = TraceGate()
