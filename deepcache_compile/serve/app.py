"""The Ray Serve deployment: an HTTP endpoint for DeepCache image generation.

Start it (Ray from PyPI: `pip install 'deepcache_compile[serve]'`):

    serve run deepcache_compile.serve.app:build                       # digits model, step-level batching
    serve run deepcache_compile.serve.app:build model=path/to/sd-pipeline max_batch=8 replicas=2

or from Python:

    >>> from ray import serve
    >>> serve.run(build({"batching": "step"}), route_prefix="/")

`model` is the shipped digits DDPM, a pixel-space `DDPMPipeline` folder (`DeepCacheService`), or a text-to-image
pipeline folder (`TextToImageService`: Stable Diffusion, SDXL). API (JSON bodies; unknown fields are refused):

    POST /generate
        pixel models:  {"seed", "batch", "height", "width", "steps", "interval", "latents", "format"}
        text-to-image: {"prompt", "negative_prompt", "guidance_scale", "steps", "seed", "height", "width",
                        "num_images", "interval", "id", "format"}
        -> image/png (the images side by side) or application/x-npy (pixel models: the final latents; text-to-image:
           the images as float32 (n, H, W, 3) in [0, 1], before rounding); header X-Generation-Id
    POST /v1/images/generations {"prompt", "n", "size": "WxH", "response_format": "b64_json", "model", "user"}
        -> {"created", "data": [{"b64_json": PNG}, ...]} (the OpenAI Images API shape; text-to-image only)
    GET /requests/{id} -> {"state", "step", "steps"} (text-to-image; the replica that runs the request answers)
    GET /stats -> counters summed over the application's replicas (requests, denoiser calls and rows, full/cached
        steps, ...), with "replicas" (how many reported) and "per_replica" (each one's own)

Bad input answers 400 with a message naming the field and the fix (422 for a body of the wrong shape: an unknown
field, a value of the wrong type or out of its numeric range, each named); a client that disconnects cancels its
generation and frees its cache rows; the replica goes on serving the others. Each replica reports its counters to
the application's `StatsBoard` (a named Ray actor: after each request and every `_BEAT_S` seconds; a replica silent
for `_STALE_S` is dropped) and as Ray Serve metrics (`deepcache_*` gauges tagged by replica, which Prometheus
sums over replicas). Replicas and autoscaling are Ray's: `replicas=N` here, or `num_replicas`
/ `autoscaling_config` in a Serve config file.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures' annotations at run time
import base64
import inspect
import io
import threading
import time
from typing import Any, Literal

import numpy as np
import ray
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Gauge

from .service import DeepCacheService, Job, ServeOptions
from .text2image import TextToImageService, is_pipeline_folder

__all__ = ["DeepCacheDeployment", "GenerateBody", "ImagesBody", "StatsBoard", "build", "encode_png", "open_service"]

_BEAT_S = 2.0  # a replica reports its counters at least this often
_STALE_S = 10.0  # a replica that has not reported for this long is gone (stopped, crashed, scaled down)

api = FastAPI(title="deepcache_compile")


_INT = dict(ge=0, le=2**31 - 1)  # sizes and counts: a number past int32 is named here, not by a C overflow


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, le=2**63 - 1)
    batch: int | None = Field(None, **_INT)
    height: int | None = Field(None, **_INT)
    width: int | None = Field(None, **_INT)
    steps: int | None = Field(None, **_INT)
    interval: int | None = Field(None, **_INT)
    latents: list[Any] | None = None
    prompt: str | None = Field(None, max_length=10_000)
    negative_prompt: str | None = Field(None, max_length=10_000)
    guidance_scale: float | None = None
    num_images: int | None = Field(None, **_INT)
    id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["png", "npy"] = "png"


class ImagesBody(BaseModel):
    """The OpenAI Images API's generation request (`POST /v1/images/generations`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=10_000)
    n: int = Field(1, **_INT)
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None


def open_service(options: ServeOptions) -> DeepCacheService | TextToImageService:
    """The service for `options.model`: text-to-image for a pipeline folder, else the pixel-model service."""
    return TextToImageService(options) if is_pipeline_folder(options.model) else DeepCacheService(options)


def encode_png(latents: torch.Tensor) -> bytes:
    """A pixel-space sample batch in [-1, 1] as one PNG, the images side by side."""
    images = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    return _png(torch.cat(list(images), dim=-1).permute(1, 2, 0).numpy())  # (H, B*W, C)


def encode_images(images: np.ndarray) -> bytes:
    """Pipeline images `(n, H, W, 3)` in [0, 1] as one PNG, side by side, rounded as diffusers' `numpy_to_pil`."""
    return _png(np.concatenate(list((images * 255).round().astype(np.uint8)), axis=1))


def _png(grid: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out, format="PNG")
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@ray.remote(num_cpus=0)
class StatsBoard:
    """The latest counters of each replica of one application, for `GET /stats` on any of them."""

    def __init__(self):
        self.replicas: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, stats: dict) -> None:
        self.replicas[replica] = (time.monotonic(), stats)

    def drop(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def get(self) -> dict[str, dict]:
        now = time.monotonic()
        self.replicas = {k: (t, v) for k, (t, v) in self.replicas.items() if now - t <= _STALE_S}
        return {k: v for k, (_, v) in self.replicas.items()}


def summed(per_replica: dict[str, dict]) -> dict:
    """Counters of several replicas as one: numbers summed, other fields kept where all replicas agree."""
    total: dict[str, Any] = {"replicas": len(per_replica)}
    for stats in per_replica.values():
        for name, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
            elif total.setdefault(name, value) != value:
                total[name] = "mixed"
    return total | {"per_replica": per_replica}


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class DeepCacheDeployment:
    """One replica: a `DeepCacheService` or `TextToImageService` behind FastAPI routes."""

    def __init__(self, options: ServeOptions):
        self.service = open_service(options)
        self.text = isinstance(self.service, TextToImageService)
        self.fields = set(inspect.signature(self.service.submit).parameters)
        self.batch_generations.set_max_batch_size(options.max_batch)
        self.batch_generations.set_batch_wait_timeout_s(options.batch_wait_s)
        self.gauges: dict[str, Gauge] = {}
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.board = StatsBoard.options(name=f"deepcache-stats-{context.app_name}", namespace="deepcache",
                                        get_if_exists=True, lifetime="detached").remote()
        self.board.put.remote(self.replica, self._metrics())
        self._quiet = threading.Event()  # set when the replica stops
        threading.Thread(target=self._beat, name="deepcache-stats", daemon=True).start()

    @api.post("/generate")
    async def generate(self, body: GenerateBody) -> Response:
        given = body.model_dump(exclude_unset=True, exclude={"format"})
        refused = sorted(set(given) - self.fields)
        if refused:
            what = "a text-to-image pipeline" if self.text else "an unconditional pixel model"
            raise HTTPException(400, f"field(s) {refused} are not taken by this server (it serves {what}): leave "
                                     f"them out; it takes {sorted(self.fields | {'format'})}")
        try:
            if "latents" in given:
                given["latents"] = torch.tensor(given["latents"], dtype=torch.float32)
            job = self.service.submit(**given)
        except (ValueError, TypeError) as err:  # torch.tensor of a ragged list raises ValueError
            raise HTTPException(status_code=400, detail=str(err)) from None
        result = await self._run(job)
        headers = {"X-Generation-Id": job.id} if self.text else {}
        if body.format == "npy":
            return Response(_npy(result if self.text else result.numpy()), media_type="application/x-npy",
                            headers=headers)
        return Response(encode_images(result) if self.text else encode_png(result), media_type="image/png",
                        headers=headers)

    @api.post("/v1/images/generations")
    async def images(self, body: ImagesBody) -> JSONResponse:
        if not self.text:
            raise HTTPException(400, "this server serves an unconditional pixel model: use POST /generate")
        if body.response_format != "b64_json":
            raise HTTPException(400, "response_format='url': this server returns images inline; ask for "
                                     "response_format='b64_json'")
        size = {} if body.size is None else dict(zip(("width", "height"), map(int, body.size.split("x"))))
        try:
            job = self.service.submit(prompt=body.prompt, num_images=body.n, **size)
        except ValueError as err:
            raise HTTPException(status_code=400, detail=str(err).replace("num_images=", "n=")) from None
        images = await self._run(job)
        data = [{"b64_json": base64.b64encode(encode_images(image[None])).decode()} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    @api.get("/requests/{id}")
    def progress(self, id: str) -> JSONResponse:
        if not self.text:
            raise HTTPException(404, "this server's requests report no progress (pixel models run whole)")
        try:
            return JSONResponse({"id": id, **self.service.progress(id)})
        except KeyError:
            raise HTTPException(404, f"no request {id!r} on this replica (finished ones are kept for a while; "
                                     "with several replicas, another may run it)") from None

    @api.get("/stats")
    async def stats(self) -> JSONResponse:
        await self.board.put.remote(self.replica, self._metrics())
        return JSONResponse(summed(await self.board.get.remote()))

    async def _run(self, job):
        try:
            if self.service.options.batching == "generation":
                result = await self.batch_generations(job)
                if result is None:  # cancelled before its group ran
                    raise HTTPException(status_code=409, detail=f"request {job.id} was cancelled")
                return result
            return await self.service.generate(job)
        except HTTPException:
            raise
        except Exception as err:  # this request failed; the replica serves on
            raise HTTPException(status_code=500, detail=f"generation failed: {err}") from None
        finally:
            await self.board.put.remote(self.replica, self._metrics())  # before the answer: /stats counts it

    def _beat(self) -> None:
        while not self._quiet.wait(_BEAT_S):
            self.board.put.remote(self.replica, self._metrics())

    def _metrics(self) -> dict:
        """This replica's counters, also set as Ray Serve gauges (`deepcache_<name>`, tagged by replica)."""
        stats = self.service.stats()
        for name, value in stats.items():
            if isinstance(value, (int, float)):
                if name not in self.gauges:
                    self.gauges[name] = Gauge(f"deepcache_{name}", description=f"DeepCache service: {name}")
                self.gauges[name].set(value)
        return stats

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def batch_generations(self, jobs: list[Job]) -> list[torch.Tensor]:
        return await self.service.generate_many(jobs)

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "_quiet"):
            self._quiet.set()
            self.board.drop.remote(self.replica)
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
