"""The text-to-image service: tiny random-weight pipelines (Stable Diffusion with a U-Net, PixArt-Sigma and SD3
with transformers, Flux), built and saved by `eval.tiny_pipelines`, served with step-level batching. Each request must
give the image of the same diffusers pipeline call run alone with `compile_deepcache` as its denoiser (1e-5
relative), while the denoiser, text-encoder and VAE calls are shared between requests."""

from __future__ import annotations

import asyncio
import inspect
import threading

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.tiny_pipelines import save_tiny_pipeline
from deepcache_compile.serve.batcher import StepBatcher
from deepcache_compile.serve.service import ServeOptions
from deepcache_compile.serve.text2image import BatchedDenoiser, TextToImageService, _absent

from conftest import make_unet

# prompt, negative prompt, guidance, steps, seed, height, width, images, interval
JOBS = [("a red car", "blur", 5.0, 6, 0, 32, 32, 1, 3), ("two cats on a mat", None, 7.5, 4, 1, 32, 32, 2, 2),
        ("a boat", "", 1.0, 6, 2, 32, 32, 1, 3), ("a tall house", "dark", 3.0, 5, 3, 48, 32, 1, 5)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd"))


def alone(folder, job) -> np.ndarray:
    """The plain diffusers pipeline call with `compile_deepcache` as its denoiser, run by itself."""
    prompt, negative, guidance, steps, seed, height, width, images, interval = job
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **_absent(folder))
    pipe.set_progress_bar_config(disable=True)
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    setattr(pipe, name, compile_deepcache(getattr(pipe, name), branch=1, interval=interval))
    negative = {} if negative is None else {"negative_prompt": negative}
    if "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
        negative["use_resolution_binning"] = False  # the server serves the size asked for (PixArt would bin it)
    with torch.no_grad():
        return pipe(prompt=prompt, **negative, guidance_scale=guidance, num_inference_steps=steps,
                    height=height, width=width, num_images_per_prompt=images, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images


def close(out: np.ndarray, ref: np.ndarray) -> bool:
    return out.shape == ref.shape and float(np.abs(out - ref).max()) <= 1e-5 * float(np.abs(ref).max())


def serve(folder, **options):
    return TextToImageService(ServeOptions(model=str(folder), branch=1, max_batch=8, batch_wait_s=0.2, **options))


async def _generate_all(service, jobs):
    submitted = [service.submit(prompt=p, negative_prompt=n, guidance_scale=g, steps=s, seed=seed, height=h, width=w,
                                num_images=k, interval=i) for p, n, g, s, seed, h, w, k, i in jobs]
    return await asyncio.gather(*(service.generate(job) for job in submitted)), submitted


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("pixart"), "pixart")


PIXART_JOBS = [("a red car", "blur", 4.5, 6, 0, 16, 16, 1, 3), ("two cats on a mat", None, 7.5, 4, 1, 16, 16, 2, 2),
               ("a boat", "", 1.0, 6, 2, 16, 16, 1, 3)]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd3"), "sd3")


@pytest.mark.parametrize("family", ["sd", "pixart", "sd3"])
def test_requests_served_together_equal_the_pipeline_run_alone(family, request):
    """Stable Diffusion (U-Net, CLIP, sizes 32 and 48 px), PixArt-Sigma (transformer, T5 with its text mask, one
    pair serving 16-32 px: 16 and 32 x 16 px requests) and SD3 (MMDiT, two CLIP encoders, 16 px; traced from batch
    2, a 1-row call padded)."""
    folder = request.getfixturevalue({"sd": "folder"}.get(family, family))
    service = serve(folder, **(dict(min_size=16, max_size=32) if family == "pixart" else {}))
    try:
        jobs = JOBS if family == "sd" else PIXART_JOBS + [("a tall house", "dark", 3.0, 5, 3, 32, 16, 1, 5)] \
            if family == "pixart" else PIXART_JOBS
        results, submitted = asyncio.run(_generate_all(service, jobs))
        for job, out in zip(jobs, results):
            assert close(out, alone(folder, job)), job
        stats = service.stats()
        request_steps = sum(job[3] for job in jobs)
        assert stats["completed"] == len(jobs) and stats["active"] == 0
        assert stats["full_steps"] + stats["cached_steps"] == request_steps
        assert stats["cached_steps"] == sum(s - len(range(0, s, i)) for *_, s, _, _, _, _, i in jobs)
        assert stats["calls"] < request_steps  # requests shared denoiser calls
        assert stats["rows"] == sum(k * (2 if g > 1 else 1) * s for _, _, g, s, _, _, _, k, _ in jobs)
        assert stats["vae_calls"] <= len(jobs) and stats["vae_rows"] == sum(job[7] for job in jobs)
        assert stats["text_encoder_calls"] < stats["text_encoder_rows"]  # encodings of several requests batched
        done = service.progress(submitted[0].id)
        assert done == {"state": "done", "step": jobs[0][3], "steps": jobs[0][3]}
    finally:
        service.close()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("flux"), "flux")


FLUX_JOBS = [("a red car", None, 3.5, 4, 0, 16, 16, 1, 2), ("two cats on a mat", None, 5.0, 3, 1, 16, 16, 2, 3),
             ("a boat", None, 3.5, 4, 2, 16, 16, 1, 2)]


@pytest.mark.parametrize("batching", ["step", "generation"])
def test_flux_requests_equal_the_pipeline_run_alone(flux, batching):
    """Flux (dual- and single-stream blocks, packed 2x2 latent tokens, guidance embedded: one row per image),
    served at 16 px (max_size; its pipeline's default is 256); with generation batching a setting's latents are
    drawn and packed per request seed. A negative prompt needs Flux's true CFG, which is not served: refused."""
    service = serve(flux, batching=batching, max_size=16)
    try:
        if batching == "step":
            results, _ = asyncio.run(_generate_all(service, FLUX_JOBS))
        else:
            submitted = [service.submit(prompt=p, guidance_scale=g, steps=s, seed=seed, height=h, width=w,
                                        num_images=k, interval=i) for p, _, g, s, seed, h, w, k, i in FLUX_JOBS]
            results = asyncio.run(service.generate_many(submitted))
        for job, out in zip(FLUX_JOBS, results):
            assert close(out, alone(flux, job)), job
        stats = service.stats()
        assert stats["completed"] == len(FLUX_JOBS)
        assert stats["rows"] == sum(k * s for _, _, _, s, _, _, _, k, _ in FLUX_JOBS)  # no CFG rows
        if batching == "step":
            assert stats["calls"] < sum(job[3] for job in FLUX_JOBS)
        else:  # the first and the last request share a setting: one pipeline call of 4 steps, the other 3
            assert stats["calls"] == 4 + 3
        with pytest.raises(ValueError, match="negative_prompt: FluxPipeline takes none"):
            service.submit(prompt="a car", negative_prompt="blur")
        with pytest.raises(ValueError, match="64 tokens, and this server serves 16..16 tokens"):
            service.submit(prompt="a car", height=32, width=32)
    finally:
        service.close()


def test_a_flux_service_serves_a_range_of_sizes_with_one_pair(flux):
    """min_size=16, max_size=32: one Flux pair over 16..64 packed tokens, compiled at the warm-up, serves 16 x 16 and
    32 x 16 px requests, each equal to the pipeline run alone; a size past the range is refused naming its token
    count."""
    jobs = [("a red car", None, 3.5, 4, 0, 16, 16, 1, 2), ("a tall house", None, 5.0, 3, 1, 32, 16, 1, 3)]
    service = serve(flux, min_size=16, max_size=32)
    try:
        results, pairs = [], []
        for job in jobs:  # one after the other: the second size compiles nothing
            results += asyncio.run(_generate_all(service, [job]))[0]
            pairs.append(len(service.dc.pairs))
        for job, out in zip(jobs, results):
            assert close(out, alone(flux, job)), job
        # one pair: the warm-up compiled it for the float timesteps Flux's pipeline passes, and both sizes ran on it
        assert pairs == [1, 1] and service.dc.shape_ranges.height == (16, 64)
        with pytest.raises(ValueError, match="96 tokens, and this server serves 16..64 tokens"):
            service.submit(prompt="a car", height=48, width=32)
    finally:
        service.close()


def test_generation_batching_runs_one_setting_as_one_pipeline_call(folder):
    """batching="generation" (Ray Serve's @serve.batch): requests of one setting are one pipeline call with their
    prompts as a list and latents from each request's own seed, still equal to each request run alone; other
    settings, and rows past max_batch, are calls of their own."""
    same = [("a red car", "blur", 5.0, 4, 0, 32, 32, 1, 2), ("two cats", None, 5.0, 4, 1, 32, 32, 2, 2),
            ("a boat", "sea", 5.0, 4, 2, 32, 32, 1, 2), ("a tree", None, 5.0, 4, 4, 32, 32, 1, 2)]
    other = [("a tall house", None, 5.0, 3, 3, 32, 32, 1, 2)]
    service = serve(folder, batching="generation")
    try:
        submitted = [service.submit(prompt=p, negative_prompt=n, guidance_scale=g, steps=s, seed=seed, height=h,
                                    width=w, num_images=k, interval=i) for p, n, g, s, seed, h, w, k, i in same + other]
        results = asyncio.run(service.generate_many(submitted))
        for job, out in zip(same + other, results):
            assert close(out, alone(folder, job)), job
        stats = service.stats()
        # 2 rows per image: `same` is 10 rows, a call of 8 and one of 2 per step (4 steps); `other` its own (3 steps)
        assert stats["completed"] == 5 and stats["calls"] == 4 + 4 + 3 and stats["vae_calls"] == 3
        assert stats["text_encoder_calls"] == 3 * 2  # per pipeline call: the prompts and the negative prompts
    finally:
        service.close()


def test_a_request_cancelled_before_its_group_runs_leaves_the_others_alone(folder):
    service = serve(folder, batching="generation")
    try:
        kept, dropped = (service.submit(prompt=p, seed=s, steps=3, interval=2) for p, s in (("a car", 0), ("a cat", 1)))
        service.cancel(dropped.id)
        images, gone = asyncio.run(service.generate_many([kept, dropped]))
        assert gone is None and close(images, alone(folder, ("a car", None, 5.0, 3, 0, 32, 32, 1, 2)))
        stats = service.stats()
        assert (stats["completed"], stats["cancelled"]) == (1, 1)
        assert service.progress(dropped.id)["state"] == "cancelled"
    finally:
        service.close()


def test_bad_requests_name_the_field_and_the_fix(folder):
    service = serve(folder)
    try:
        for kwargs, message in [
            (dict(prompt=""), "prompt: give a non-empty text"),
            (dict(prompt="a", guidance_scale=-1.0), "guidance_scale=-1.0: give a finite number >= 0"),
            (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale=nan"),
            (dict(prompt="a", height=18), "height=18: give a multiple of"),
            (dict(prompt="a", width=5), "width=5: give a multiple of"),
            (dict(prompt="a", num_images=5), "num_images=5: this server generates 1..4 images per request"),
            (dict(prompt="a", num_images=0), "num_images=0"),
            (dict(prompt="a", steps=0), "steps=0: a generation has 1..1000 steps"),
            (dict(prompt="a", seed=2**63), "seed=9223372036854775808"),
            (dict(prompt="a", interval=0), "interval=0"),
        ]:
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
                service.submit(**kwargs)
        with pytest.raises(ValueError, match=r"height=160: this server serves 32\.\.128 pixels a side"):
            service.submit(prompt="a", height=160)
        assert service.submit(prompt="a", num_images=8, guidance_scale=1.0).num_images == 8  # no guidance: 1 row each
    finally:
        service.close()


def test_a_cancelled_request_frees_its_rows_and_the_others_finish(folder):
    service = serve(folder, batching="step")

    async def run():
        slow = service.submit(prompt="a slow one", steps=400, id="slow")
        task = asyncio.ensure_future(service.generate(slow))
        while service.progress("slow")["state"] != "denoising" or service.progress("slow")["step"] < 2:
            await asyncio.sleep(0.01)
        job = JOBS[0]
        other = asyncio.ensure_future(_generate_all(service, [job]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (out,), _ = await other
        return job, out

    try:
        job, out = asyncio.run(run())
        assert close(out, alone(folder, job))
        assert service.progress("slow")["state"] == "cancelled" and service.progress("slow")["step"] < 400
        assert service.batcher.active == 0 and service.stats()["cancelled"] == 1
    finally:
        service.close()


def test_a_joined_request_in_a_pipeline_thread_runs_as_the_drop_in():
    """The batcher's driven requests on their own: one SD pipeline thread per request, `BatchedDenoiser` as its U-Net,
    the batcher ticking in another thread: each request equals its pipeline with the drop-in DeepCacheUNet."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,), latent_channels=4, norm_num_groups=8).eval()
    unet = make_unet("sd")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(5)
    embeds = [torch.randn(1, 7, 32, generator=gen) for _ in range(3)]

    def call(p, e, steps):
        return p(prompt_embeds=e, negative_prompt_embeds=-e, num_inference_steps=steps, guidance_scale=4.0,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images

    dynamic = dict(batch=(1, 8), height=(8, 8), width=(8, 8))
    batcher = StepBatcher(compile_deepcache(unet, branch=1, interval=2, dynamic=dynamic), pipe.scheduler)
    stop, results = threading.Event(), {}
    worker = threading.Thread(target=batcher.run_forever, args=(stop,), daemon=True)
    worker.start()

    def client(i, steps):
        p = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler()})
        p.set_progress_bar_config(disable=True)
        p.unet = BatchedDenoiser(batcher, p.scheduler)
        with torch.no_grad():
            results[i] = call(p, embeds[i], steps)

    threads = [threading.Thread(target=client, args=(i, s)) for i, s in enumerate((5, 3, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    pipe.unet = compile_deepcache(unet, branch=1, interval=2)
    with torch.no_grad():
        for i, steps in enumerate((5, 3, 5)):
            assert close(results[i], call(pipe, embeds[i], steps)), i
    assert batcher.calls < 13 and batcher.rows == 2 * 13 and batcher.active == 0


def test_calls_from_several_threads_run_as_one_batched_call():
    from deepcache_compile.serve.coalesce import Coalescer

    weight, seen = torch.randn(3, 5), []

    def fn(x, scale=1.0, extra=None):
        seen.append(x.shape[0])
        if scale < 0:
            raise ValueError("negative scale")
        return {"y": x @ weight * scale, "n": x.shape[0], "pair": (x.sum(1), extra)}

    coalesced = Coalescer(fn, window_s=0.3)
    inputs = [torch.randn(rows, 3) for rows in (1, 2, 3, 1)]
    calls = [((inputs[0],), {}), ((inputs[1],), {}), ((inputs[2],), {"scale": 2.0}), ((inputs[3],), {"scale": -1.0})]
    barrier, results = threading.Barrier(len(calls)), {}

    def client(i):
        barrier.wait()
        try:
            results[i] = coalesced(*calls[i][0], **calls[i][1])
        except ValueError as err:
            results[i] = err

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [1, 3, 3]  # rows 1+2 at scale 1 together; scale 2 and scale -1 alone
    assert coalesced.calls == 2 and coalesced.rows == 6  # the failing call counts no run
    for i in range(3):
        want = fn(*calls[i][0], **calls[i][1])
        assert torch.allclose(results[i]["y"], want["y"], rtol=1e-6, atol=1e-6)
        assert torch.allclose(results[i]["pair"][0], want["pair"][0]) and results[i]["pair"][1] is None
    assert isinstance(results[3], ValueError) and "negative scale" in str(results[3])


def test_the_service_tokenizes_one_request_at_a_time(folder):
    """A fast tokenizer's call sets padding and truncation on the shared Rust object: threads that tokenize with
    other settings at once get each other's (measured: dozens of 1,200 calls padded to the wrong length). The
    service's tokenizer stand-in serializes them."""
    from transformers import CLIPTokenizer

    from deepcache_compile.serve.text2image import _Serialized

    def stress(tokenizer) -> int:
        wrong = []

        def worker(i):
            for _ in range(300):
                if i % 2:
                    wrong.append(len(tokenizer("a boat", padding="max_length", max_length=8,
                                               truncation=True).input_ids) != 8)
                else:
                    tokenizer("two cats on a mat", padding="longest")
                    tokenizer.tokenize("a mat")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(wrong)

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert stress(_Serialized(tokenizer)) == 0
    assert stress(tokenizer) > 0  # the race the stand-in removes is real (if this ever fails, it is gone upstream)


def test_a_text_service_from_engine_files(folder, tmp_path):
    """The pipeline's U-Net exported (pt2, batch 1..8, one timestep per row) serves in place of the compiled pair:
    the pipeline is loaded without its U-Net and each request equals the pipeline run alone."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    example = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.full((2,), 999),
               "encoder_hidden_states": torch.randn(2, 8, 32)}
    compile_deepcache(unet, branch=1).export(tmp_path / "unet", format="pt2", example=example, batch=(1, 8),
                                             height=(16, 32), width=(16, 32))
    service = serve(folder, engine=str(tmp_path / "unet"))
    try:
        assert service.pipe.__dict__.get("unet") is None  # no U-Net weights loaded
        jobs = JOBS[:2]
        results, _ = asyncio.run(_generate_all(service, jobs))
        for job, out in zip(jobs, results):
            assert close(out, alone(folder, job)), job
    finally:
        service.close()
