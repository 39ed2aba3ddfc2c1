"""Serving many DeepCache generations at once: continuous step-level batching (`StepBatcher`), a generation
service with three ways to batch (`DeepCacheService`), and its Ray Serve application (`serve.app`, imports Ray)."""

from .batcher import Request, StepBatcher
from .service import DeepCacheService, Job, ServeOptions

__all__ = ["DeepCacheService", "Job", "Request", "ServeOptions", "StepBatcher"]
