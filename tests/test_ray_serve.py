"""The Ray Serve deployment over real HTTP on loopback, and the service's three batching modes.

Ray is started by the test (`ray.init(num_cpus=2)`, no dashboard, its files under pytest's temp folder),
serves on 127.0.0.1 only and is shut down at the end of the module."""

from __future__ import annotations

import asyncio
import io
import base64
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepcache_compile import Schedule, compile_deepcache
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.eval.tiny_pipelines import save_tiny_pipeline
from deepcache_compile.serve.service import DeepCacheService, ServeOptions

from test_text2image import alone

# (seed, batch, size, steps, interval)
JOBS = [(0, 1, 16, 8, 3), (1, 2, 12, 6, 2), (2, 1, 20, 10, 5), (3, 1, 16, 5, 1)]


def noise(seed: int, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def expected():
    """Each job generated alone, by the plain diffusers-style loop over a static DeepCacheUNet."""
    unet, scheduler = load_digits_model()
    dc = compile_deepcache(unet, branch=1)
    return {job: ddim_loop(dc.with_schedule(Schedule("uniform", interval=job[4])), {"sample": noise(*job[:3])},
                           job[3], scheduler) for job in JOBS}


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return out.shape == ref.shape and float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# ------------------------------------------------------------------------------------------------ HTTP, Ray
@pytest.fixture(scope="module")
def server():
    ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'deepcache_compile[serve]'")
    requests = pytest.importorskip("requests")
    from ray import serve

    from deepcache_compile.serve.app import build

    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's session files in this worker's temp folder (tests/conftest.py), not /tmp/ray; a short path, since
    # Ray's Unix sockets live under it (at most 107 characters).
    # Three replicas of one CPU each (two of the digits app): Ray's CPUs are logical, the replicas mostly wait.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"batching": "step", "max_batch": "8", "replicas": "2"}), name="digits",
                  route_prefix="/digits")
        sd = save_tiny_pipeline(Path(tempfile.mkdtemp(prefix="sd")))
        serve.run(build({"model": str(sd), "max_batch": "8", "batch_wait_s": "0.05"}), name="sd", route_prefix="/sd")
        yield f"http://127.0.0.1:{port}/digits", requests, f"http://127.0.0.1:{port}/sd", sd
    finally:
        serve.shutdown()
        ray.shutdown()


def post(server, timeout=120, **body):
    url, requests, *_ = server
    return requests.post(f"{url}/generate", data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=timeout)


def test_http_generations_equal_their_single_request_runs(server, expected):
    results = {}

    def client(job):
        seed, batch, size, steps, interval = job
        results[job] = post(server, seed=seed, batch=batch, height=size, width=size, steps=steps,
                            interval=interval, format="npy")

    threads = [threading.Thread(target=client, args=(job,)) for job in JOBS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job, response in results.items():
        assert response.status_code == 200, response.text
        assert close(torch.from_numpy(np.load(io.BytesIO(response.content))), expected[job]), job
    # the PNG: the batch side by side, [-1, 1] mapped to 0..255
    from PIL import Image

    job = JOBS[1]
    response = post(server, seed=job[0], batch=job[1], height=job[2], width=job[2], steps=job[3], interval=job[4])
    assert response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    ref = expected[job].numpy()[:, 0]  # (batch, H, W)
    want = np.rint((np.clip(np.concatenate(list(ref), axis=1), -1, 1) + 1) * 127.5)
    assert image.shape == want.shape and np.abs(image.astype(float) - want).max() <= 1


@pytest.mark.parametrize("body, status, message", [
    (dict(steps=0), 400, "steps=0: a generation has 1..1000 steps"),
    (dict(height=40), 400, "height=40 is outside this server's range 8..32"),
    (dict(width=10), 400, "width=10 is not a multiple of 4"),
    (dict(batch=9), 400, "batch=9 is outside this server's range 1..8"),
    (dict(interval=0), 400, "interval=0"),
    (dict(latents=[[[[1.0, 2.0], [3.0]]]]), 400, "expected sequence of length 2"),
    (dict(latents=[[[[0.0] * 16] * 16] * 3]), 400, "latents of shape (1, 3, 16, 16): give (batch, 1, height, width)"),
    (dict(batch="two"), 422, "batch"),
    (dict(format="gif"), 422, "format"),
    (dict(sede=3), 422, "sede"),  # a misspelt field is refused, not ignored
    (dict(seed=2**64), 422, "seed"),  # named, not "Overflow when unpacking long long"
    (dict(height=2**40), 422, "height"),
    (dict(prompt="a cat"), 400, "field(s) ['prompt'] are not taken by this server (it serves an unconditional"),
])
def test_bad_requests_are_4xx_with_a_message(server, body, status, message):
    response = post(server, **body)
    assert response.status_code == status
    assert message in response.text


def test_nan_latents_are_refused_and_the_replica_serves_on(server, expected):
    latents = noise(*JOBS[0][:3]).tolist()
    latents[0][0][3][3] = float("nan")
    url, requests, *_ = server
    response = requests.post(f"{url}/generate", data=json.dumps({"latents": latents}),  # json.dumps writes NaN
                             headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400 and "contains NaN or inf" in response.text
    seed, batch, size, steps, interval = JOBS[0]
    response = post(server, latents=noise(seed, batch, size).tolist(), steps=steps, interval=interval, format="npy")
    assert close(torch.from_numpy(np.load(io.BytesIO(response.content))), expected[JOBS[0]])


def test_a_client_that_disconnects_cancels_its_generation(server, expected):
    url, requests, *_ = server
    before = requests.get(f"{url}/stats").json()
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(server, steps=1000, timeout=1.0)  # ~1000 steps: far longer than the client waits
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = requests.get(f"{url}/stats").json()
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.2)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0  # its rows are gone
    assert stats["rows"] - before["rows"] < 1000  # it stopped before its 1000 steps
    seed, batch, size, steps, interval = JOBS[2]
    response = post(server, seed=seed, batch=batch, height=size, width=size, steps=steps, interval=interval,
                    format="npy")
    assert close(torch.from_numpy(np.load(io.BytesIO(response.content))), expected[JOBS[2]])


def test_stats_count_the_requests_of_every_replica(server):
    """Two digits replicas: /stats on either counts what both ran (each used to answer with its own counters).
    Bursts of concurrent requests until both replicas have served some (Ray picks the replica)."""
    url, requests, *_ = server
    before = requests.get(f"{url}/stats").json()
    assert before["replicas"] == 2 and len(before["per_replica"]) == 2
    for burst in range(1, 5):
        threads = [threading.Thread(target=post, args=(server,), kwargs=dict(seed=s, steps=3, format="npy"))
                   for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = requests.get(f"{url}/stats").json()
        assert after["completed"] == before["completed"] + 8 * burst
        served = [r["completed"] - before["per_replica"][k]["completed"] for k, r in after["per_replica"].items()]
        if min(served) > 0:
            break
    assert min(served) > 0, f"every request went to one replica in {burst} bursts: the sum was not exercised"


# ------------------------------------------------------------------------------- the service, without Ray
def test_one_at_a_time_is_bitwise_and_whole_generation_batches_are_close(expected):
    async def run(service, jobs, many):
        submitted = [service.submit(seed=j[0], batch=j[1], height=j[2], width=j[2], steps=j[3], interval=j[4])
                     for j in jobs]
        if many:
            return await service.generate_many(submitted)
        return await asyncio.gather(*(service.generate(job) for job in submitted))

    alone = DeepCacheService(ServeOptions(batching="none", max_batch=8, threads=torch.get_num_threads()))
    try:
        outs = asyncio.run(run(alone, JOBS, many=False))
        for job, out in zip(JOBS, outs):
            assert torch.equal(out, expected[job]), job  # same arithmetic as the loop run alone
    finally:
        alone.close()
    batched = DeepCacheService(ServeOptions(batching="generation", max_batch=3, threads=torch.get_num_threads()))
    try:
        jobs = JOBS + [(9, 2, 12, 6, 2)]  # joins (1, 2, 12, 6, 2): 4 rows > max_batch=3, so two calls
        outs = asyncio.run(run(batched, jobs, many=True))
        for job, out in zip(JOBS, outs):
            assert close(out, expected[job]), job
        assert close(outs[-1], ddim_loop(batched.dc.with_schedule(Schedule("uniform", interval=2)),
                                         {"sample": noise(9, 2, 12)}, 6, batched.scheduler))
    finally:
        batched.close()


def test_a_cancelled_task_stops_its_generation(expected):
    service = DeepCacheService(ServeOptions(batching="none", threads=torch.get_num_threads()))

    async def run():
        slow = asyncio.create_task(service.generate(service.submit(steps=1000)))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        seed, batch, size, steps, interval = JOBS[0]
        return await service.generate(service.submit(seed=seed, batch=batch, height=size, width=size, steps=steps,
                                                     interval=interval))

    try:
        out = asyncio.run(run())
        assert torch.equal(out, expected[JOBS[0]])
        stats = service.stats()
        assert (stats["completed"], stats["cancelled"], stats["failed"]) == (1, 1, 0)
        assert stats["calls"] < 1000  # the cancelled generation stopped early (and the next one ran its 8)
    finally:
        service.close()


def test_options_from_serve_run_arguments():
    options = ServeOptions.from_strings({"batching": "generation", "max_batch": "4", "batch_wait_s": "0.5",
                                         "min_size": "8", "onednn_cache": "64"})
    assert (options.batching, options.max_batch, options.batch_wait_s, options.min_size, options.onednn_cache) == (
        "generation", 4, 0.5, 8, 64)
    for bad in (-2, 0):
        with pytest.raises(ValueError, match=f"onednn_cache={bad}: give a number of entries >= 1, or -1"):
            ServeOptions(onednn_cache=bad)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['batchsize'\]"):
        ServeOptions.from_strings({"batchsize": "4"})
    with pytest.raises(ValueError, match="batching='tokens': use one of step, generation, none"):
        ServeOptions(batching="tokens")


# ------------------------------------------------------------------------------------ text-to-image over HTTP
def post_sd(server, path="/generate", timeout=120, **body):
    _, requests, url, _ = server
    return requests.post(f"{url}{path}", data=json.dumps(body), headers={"content-type": "application/json"},
                         timeout=timeout)


def test_prompts_over_http_equal_the_pipeline_run_alone(server):
    """Two prompts at once (one with two images); each equals the diffusers pipeline run alone with DeepCache,
    before PNG rounding (npy) and after (PNG within one level); progress and the request id are reported."""
    folder = server[3]
    jobs = {"car": ("a red car", "blur", 5.0, 6, 0, 32, 32, 1, 5), "cats": ("two cats", None, 7.5, 4, 1, 32, 32, 2, 5)}
    results = {}

    def client(name):
        prompt, negative, guidance, steps, seed, height, width, n, _ = jobs[name]
        results[name] = post_sd(server, prompt=prompt, guidance_scale=guidance, steps=steps, seed=seed, height=height,
                                width=width, num_images=n, id=name, format="npy",
                                **({} if negative is None else {"negative_prompt": negative}))

    threads = [threading.Thread(target=client, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, requests, url, _ = server
    for name, response in results.items():
        assert response.status_code == 200, response.text
        assert response.headers["x-generation-id"] == name
        out, ref = np.load(io.BytesIO(response.content)), alone(folder, jobs[name])
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), name
        progress = requests.get(f"{url}/requests/{name}").json()
        assert progress == {"id": name, "state": "done", "step": jobs[name][3], "steps": jobs[name][3]}
    from PIL import Image

    response = post_sd(server, prompt="two cats", guidance_scale=7.5, steps=4, seed=1, height=32, width=32,
                       num_images=2)
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    want = (np.concatenate(list(alone(folder, jobs["cats"])), axis=1) * 255).round()
    assert image.shape == want.shape and np.abs(image.astype(float) - want).max() <= 1
    assert requests.get(f"{url}/requests/nobody").status_code == 404
    stats = requests.get(f"{url}/stats").json()
    assert stats["full_steps"] > 0 and stats["cached_steps"] > 0 and stats["text_encoder_calls"] > 0


def test_the_openai_images_api_shape(server):
    from PIL import Image

    folder = server[3]
    response = post_sd(server, "/v1/images/generations", prompt="a red car", n=2, size="32x32",
                       response_format="b64_json", model="anything")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2
    want = alone(folder, ("a red car", None, 5.0, 20, 0, 32, 32, 2, 5))  # the server's defaults: steps 20, seed 0
    for image, ref in zip(data, want):
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))))
        assert png.shape == (32, 32, 3) and np.abs(png.astype(float) - (ref * 255).round()).max() <= 1


@pytest.mark.parametrize("path, body, status, message", [
    ("/generate", dict(prompt=""), 400, "prompt: give a non-empty text"),
    ("/generate", dict(prompt="a", guidance_scale=-2), 400, "guidance_scale=-2.0: give a finite number >= 0"),
    ("/generate", dict(prompt="a", height=40), 400, "height=40: give a multiple of 16 pixels"),
    ("/generate", dict(prompt="a", num_images=5), 400, "num_images=5: this server generates 1..4 images"),
    ("/generate", dict(prompt="a", batch=2), 400, "field(s) ['batch'] are not taken by this server"),
    ("/generate", dict(prompt="a", sede=1), 422, "sede"),
    ("/v1/images/generations", dict(prompt="a", n=9), 400, "n=9: this server generates 1..4 images"),
    ("/v1/images/generations", dict(prompt="a", size="big"), 422, "size"),
    ("/v1/images/generations", dict(prompt="a", response_format="url"), 400, "response_format='b64_json'"),
])
def test_bad_prompt_requests_are_4xx_with_the_reason(server, path, body, status, message):
    response = post_sd(server, path, **body)
    assert response.status_code == status and message in response.text, response.text
