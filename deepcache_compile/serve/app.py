"""The Ray Serve deployment: an HTTP endpoint for DeepCache image generation on `DeepCacheService`.

Start it (Ray from PyPI: `pip install 'deepcache_compile[serve]'`):

    serve run deepcache_compile.serve.app:build                       # digits model, step-level batching
    serve run deepcache_compile.serve.app:build batching=generation max_batch=8 replicas=2

or from Python:

    >>> from ray import serve
    >>> serve.run(build({"batching": "step"}), route_prefix="/")

API (JSON body; every field optional):

    POST /generate {"seed": 0, "batch": 1, "height": 16, "width": 16, "steps": 20, "interval": 5,
                    "latents": [[[[...]]]], "format": "png" | "npy"}
        -> image/png (the batch side by side) or application/x-npy (the final latents, float32)
    GET /stats -> {"batching", "completed", "cancelled", "failed", "active", "calls", "rows"}

Bad input answers 400 with a message naming the problem and the fix (422 for a malformed body); a client
that disconnects cancels its generation and frees its cache rows; the replica goes on serving the others.
Replicas and autoscaling are Ray's: `replicas=N` here, or `num_replicas` / `autoscaling_config` in a Serve
config file.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations at run time
import io
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from .service import DeepCacheService, Job, ServeOptions

__all__ = ["DeepCacheDeployment", "GenerateBody", "build", "encode_png"]

api = FastAPI(title="deepcache_compile")


class GenerateBody(BaseModel):
    seed: int = 0
    batch: int = 1
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    interval: int | None = None
    latents: list[Any] | None = None
    format: Literal["png", "npy"] = "png"


def encode_png(latents: torch.Tensor) -> bytes:
    """A pixel-space sample batch in [-1, 1] as one PNG, the images side by side."""
    from PIL import Image

    images = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    grid = torch.cat(list(images), dim=-1).permute(1, 2, 0).numpy()  # (H, B*W, C)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class DeepCacheDeployment:
    """One replica: a `DeepCacheService` behind FastAPI routes."""

    def __init__(self, options: ServeOptions):
        self.service = DeepCacheService(options)
        self.batch_generations.set_max_batch_size(options.max_batch)
        self.batch_generations.set_batch_wait_timeout_s(options.batch_wait_s)

    @api.post("/generate")
    async def generate(self, body: GenerateBody) -> Response:
        try:
            latents = None if body.latents is None else torch.tensor(body.latents, dtype=torch.float32)
            job = self.service.submit(seed=body.seed, batch=body.batch, height=body.height, width=body.width,
                                      steps=body.steps, interval=body.interval, latents=latents)
        except (ValueError, TypeError) as err:  # torch.tensor of a ragged list raises ValueError
            raise HTTPException(status_code=400, detail=str(err)) from None
        try:
            if self.service.options.batching == "generation":
                result = await self.batch_generations(job)
            else:
                result = await self.service.generate(job)
        except Exception as err:  # this request failed; the replica serves on
            raise HTTPException(status_code=500, detail=f"generation failed: {err}") from None
        if body.format == "npy":
            out = io.BytesIO()
            np.save(out, result.numpy())
            return Response(out.getvalue(), media_type="application/x-npy")
        return Response(encode_png(result), media_type="image/png")

    @api.get("/stats")
    def stats(self) -> JSONResponse:
        return JSONResponse(self.service.stats())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def batch_generations(self, jobs: list[Job]) -> list[torch.Tensor]:
        return await self.service.generate_many(jobs)

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "service"):
            self.service.close()


def build(args: dict[str, str] | None = None) -> Application:
    """The application for `serve run deepcache_compile.serve.app:build key=value ...`: the `ServeOptions`
    fields, plus `replicas` (default 1). Each replica asks Ray for `threads` CPUs."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    options = ServeOptions.from_strings(args)
    return DeepCacheDeployment.options(num_replicas=replicas,
                                       ray_actor_options={"num_cpus": options.threads}).bind(options)
