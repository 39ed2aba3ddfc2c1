"""Serving many DeepCache generations at once: continuous step-level batching (`StepBatcher`)."""

from .batcher import Request, StepBatcher

__all__ = ["Request", "StepBatcher"]
