"""`pipe.transformer = compile_deepcache(pipe.transformer, ...)` in diffusers' PixArt-Sigma, SD3 and Flux pipelines,
built from tiny random components (the text encoders' outputs are passed as prompt embeddings: the pipelines
need no tokenizer or text encoder then). Classifier-free guidance runs batched (two rows per call)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from deepcache_compile import compile_deepcache, load_deepcache
from deepcache_compile.artifacts.native import library_path

from conftest import make_transformer, make_transformer_call


def _vae(latent_channels: int) -> diffusers.AutoencoderKL:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent_channels,
        norm_num_groups=4, sample_size=16, shift_factor=0.0).eval()


def _pipeline(family: str):
    """The pipeline and its call (prompt embeddings in place of text encoders), 16 x 16 px, 6 steps, CFG 4."""
    transformer, gen = make_transformer(family), torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    common = dict(num_inference_steps=6, height=16, width=16, output_type="pt", guidance_scale=4.0)
    if family == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(4), transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
        mask = torch.ones(1, 5)
        call = dict(prompt_embeds=randn(1, 5, 12), prompt_attention_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=randn(1, 5, 12), negative_prompt_attention_mask=mask,
                    use_resolution_binning=False)
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
            tokenizer_3=None)
        call = dict(prompt_embeds=randn(1, 5, 12), pooled_prompt_embeds=randn(1, 10),
                    negative_prompt_embeds=randn(1, 5, 12), negative_pooled_prompt_embeds=randn(1, 10))
    else:  # Flux: 2x2 latent patches packed into 8-channel tokens; guidance is distilled (one row per call)
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                      vae=_vae(2), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                      tokenizer_2=None)
        call = dict(prompt_embeds=randn(1, 5, 12), pooled_prompt_embeds=randn(1, 10))
    pipe.set_progress_bar_config(disable=True)
    return pipe, {**common, **call}


def _images(pipe, call) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_drop_in_for_the_transformer_pipelines(family):
    """All-full steps give the plain pipeline's images bit for bit; N=3 caches on 4 of 6 steps and changes them."""
    pipe, call = _pipeline(family)
    plain, transformer = _images(pipe, call), pipe.transformer
    pipe.transformer = compile_deepcache(transformer, branch=0, interval=1)
    assert torch.equal(_images(pipe, call), plain) and pipe.transformer.history == "FFFFFF"
    pipe.transformer = compile_deepcache(transformer, branch=0, interval=3)
    cached = _images(pipe, call)
    assert pipe.transformer.history == "FSSFSS"
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert (cached - plain).abs().max() < 0.5  # the same image, approximately (random weights: no quality claim)


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_transformer_pipelines_on_inductor_equal_eager(family):
    pipe, call = _pipeline(family)
    transformer = pipe.transformer
    pipe.transformer = compile_deepcache(transformer, branch=0, interval=3)
    eager = _images(pipe, call)
    pipe.transformer = compile_deepcache(transformer, branch=0, interval=3, backend="inductor")
    torch.testing.assert_close(_images(pipe, call), eager, rtol=1e-3, atol=1e-3)
    assert pipe.transformer.history == "FSSFSS"


# Dynamic batch (one resolution per pair), the step batcher and engine files, on DiT, PixArt and SD3.

def _conditions(family: str, rows: int, seed: int) -> dict:
    call = {k: v for k, v in make_transformer_call(family, batch=rows, seed=seed).items()
            if k not in ("hidden_states", "timestep", "added_cond_kwargs")}
    return call


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_one_dynamic_batch_pair_serves_every_batch_size_bitwise(family):
    """SD3 and Flux do not trace with batch 1 in the range (their joint attention guards `batch != 1`): they are
    traced from batch 2 and a batch-1 call runs as two equal rows, equal to the static batch-1 pair up to batched
    rounding. Flux's sample is packed tokens (batch, tokens, channels): one token count per pair. Without
    height/width ranges a pair serves the example's resolution."""
    model = make_transformer(family)
    dynamic = compile_deepcache(model, branch=0, interval=2, dynamic=dict(batch=(1, 4)))
    static = compile_deepcache(model, branch=0, interval=2)
    for rows in (2, 1, 3):
        call = make_transformer_call(family, batch=rows)
        if family == "pixart":  # the pipeline's text mask: its batch is equated with the sample's in the trace
            call["encoder_attention_mask"] = (torch.arange(5) < torch.arange(5, 5 - rows, -1)[:, None]).float()
        for t in (900, 800):  # full, then cached
            call["timestep"] = torch.full((rows,), t, dtype=call["timestep"].dtype)
            out, ref = dynamic(**call).sample, static(**call).sample
            if family in ("sd3", "flux") and rows == 1:
                assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-6 * ref.abs().max()
            else:
                assert torch.equal(out, ref)
        dynamic.reset(), static.reset()
    assert len(dynamic.pairs) == 1 and dynamic.shape_ranges.height == ((16, 16) if family == "flux" else (8, 8))
    if family == "flux":  # tokens in one dimension: no height to range over
        with pytest.raises(ValueError, match="takes a sample of shape"):
            compile_deepcache(model, branch=0, dynamic=dict(batch=(1, 4), height=(8, 16)))(
                **make_transformer_call(family))
        return
    # Without height/width the pair serves the example's resolution (the ranges' tests: tests/test_transformers.py);
    # a range that leaves the example out is refused.
    with pytest.raises(ValueError, match="height=\\(12, 16\\) leaves out the example's height 8"):
        compile_deepcache(model, branch=0, dynamic=dict(batch=(1, 4), height=(12, 16)))(**make_transformer_call(family))


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_the_step_batcher_serves_a_transformer(family):
    """Requests of 1-3 rows with their own conditioning, step counts and intervals, batched per step, each equal
    to its generation alone (1e-5)."""
    from diffusers import DDIMScheduler

    from deepcache_compile import Schedule
    from deepcache_compile.eval.sampling import ddim_loop
    from deepcache_compile.serve import StepBatcher

    model = make_transformer(family, out_channels=4)  # noise only (no learned variance): what DDIM steps take
    scheduler = DDIMScheduler()
    alone = compile_deepcache(model, branch=0)
    jobs = [(1, 6, 2), (2, 5, 3), (3, 7, 2), (1, 4, 3)]  # rows, steps, interval
    noise = {job: torch.randn(job[0], 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i, job in enumerate(jobs)}
    conditions = {job: _conditions(family, job[0], seed=i) for i, job in enumerate(jobs)}

    def run_alone(job):
        model_call = alone.with_schedule(Schedule("uniform", interval=job[2]))
        return ddim_loop(lambda x, t, **kw: model_call(hidden_states=x, timestep=t.expand(x.shape[0]), **kw),
                         {"sample": noise[job], **conditions[job]}, job[1], scheduler)

    expected = {job: run_alone(job) for job in jobs}
    batcher = StepBatcher(compile_deepcache(model, branch=0, dynamic=dict(batch=(1, 6))), scheduler)
    requests = {job: batcher.submit(noise[job], steps=job[1], interval=job[2], **conditions[job]) for job in jobs}
    while batcher.active:
        batcher.tick()
    for job, request in requests.items():
        out, ref = request.wait(0), expected[job]
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), job
    assert batcher.rows == sum(rows * steps for rows, steps, _ in jobs) and batcher.calls < sum(s for _, s, _ in jobs)


def test_transformer_pt2_engine_serves_every_batch_size(tmp_path):
    model = make_transformer("dit")
    dc = compile_deepcache(model, branch=0, interval=2)
    dc.export(tmp_path, format="pt2", example=make_transformer_call("dit", batch=2), batch=(1, 4))
    manifest = json.loads((tmp_path / "deepcache.json").read_text())
    assert manifest["ranges"]["height"] == [8, 8] and manifest["cache"]["shape"] == "[batch, 16, 16]"
    engine = load_deepcache(tmp_path)
    for rows in (1, 3):
        call = make_transformer_call("dit", batch=rows)
        for t in (900, 800, 700):
            call["timestep"] = torch.full((rows,), t)
            assert torch.equal(engine(**call).sample, dc(**call).sample)
        assert engine.history == dc.history == "FSF"
        engine.reset(), dc.reset()


@pytest.mark.skipif(not library_path().is_file(), reason="the native runtime is not built: run `make native`")
def test_transformer_aoti_engine_serves_a_resolution_range_in_python_native_and_the_program(tmp_path):
    """PixArt exported once as AOTInductor packages over a range of resolutions (token counts 16-64): at two
    sizes (8 x 8 and a non-square 12 x 16 latent) the Python engine, the native engine and deepcache-generate
    (its learned-variance output halved as the pipelines do) give the latents of the eager model cached the same
    way, with the same history; the manifest states the cached residual's token count."""
    import subprocess
    from pathlib import Path

    from diffusers import DDIMScheduler
    from safetensors.torch import load_file, save_file

    model, scheduler = make_transformer("pixart"), DDIMScheduler()
    dc = compile_deepcache(model, branch=0, interval=2)
    dc.export(tmp_path / "engine", format="aoti", example=make_transformer_call("pixart", batch=2), batch=(1, 4),
              height=(8, 16), width=(8, 16), scheduler=scheduler)
    manifest = json.loads((tmp_path / "engine" / "deepcache.json").read_text())
    assert manifest["ranges"]["height"] == [8, 16] and manifest["cache"]["shape"] == "[batch, height*width/4, 16]"
    engines = [load_deepcache(tmp_path / "engine"), load_deepcache(tmp_path / "engine", runtime="native")]
    program = Path(__file__).parents[1] / "build" / "deepcache-generate"
    for rows, height, width in ((3, 8, 8), (2, 12, 16)):
        noise, text = torch.randn(rows, 4, height, width), torch.randn(rows, 5, 12)

        def loop(transformer):
            steps = DDIMScheduler.from_config(scheduler.config)
            steps.set_timesteps(6)
            x = noise
            for t in steps.timesteps:
                out = transformer(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(rows).float()).sample
                x = steps.step(out.chunk(2, dim=1)[0], t, x).prev_sample
            history = transformer.history
            transformer.reset()
            return x, history

        runs = [loop(dc)] + [loop(engine) for engine in engines]
        save_file({"sample": noise, "encoder_hidden_states": text}, tmp_path / "in.safetensors")
        result = subprocess.run([str(program), str(tmp_path / "engine"), str(tmp_path / "in.safetensors"),
                                 str(tmp_path / "out.safetensors"), "--steps", "6"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        runs.append((load_file(tmp_path / "out.safetensors")["sample"], result.stdout.split()[1]))
        assert [history for _, history in runs] == ["FSFSFS"] * 4
        assert runs[0][0].shape == (rows, 4, height, width)
        for latents, _ in runs[1:]:
            torch.testing.assert_close(latents, runs[0][0], rtol=5e-4, atol=5e-4)
        torch.testing.assert_close(runs[3][0], runs[1][0], rtol=1e-5, atol=1e-5)  # the same packages


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_exports_serve_batch_one_padded(family, tmp_path):
    """SD3 and Flux trace only from batch 2 (their joint attention is guarded `batch != 1`): the AOTInductor export
    is compiled from batch 2 and says so (`pad_batch`), and the engines run a batch-1 call as two equal rows. Each
    batch size's outputs equal the in-process module run unpadded (rounding of the other batch size's kernels),
    the C++ runtime's equal the Python runtime's, and a batch-1 generation in deepcache-generate (its own
    flow-matching sampler, set as the model's pipeline sets it) equals the Python engine driven by diffusers: SD3 by
    a loop with FlowMatchEulerDiscreteScheduler (shift 3), Flux by FluxPipeline itself (FLUX.1's dynamic shift:
    sigmas linspace(1, 1/N, N), mu from the token count, timesteps / 1000)."""
    import subprocess
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import load_file, save_file

    model = make_transformer(family)
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(dict(shift=3.0) if family == "sd3" else
           dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096)))  # FLUX.1-dev's scheduler config
    dc = compile_deepcache(model, branch=0, interval=2)
    dc.export(tmp_path, format="aoti", example=make_transformer_call(family, batch=2), batch=(1, 4),
              scheduler=scheduler, **(dict(tokens=(16, 64)) if family == "flux" else {}))
    manifest = json.loads((tmp_path / "deepcache.json").read_text())
    assert manifest["pad_batch"] == 2 and manifest["ranges"]["batch"] == [2, 4]
    assert manifest["ranges"]["height"] == ([16, 64] if family == "flux" else [8, 8])  # Flux: tokens
    assert [i["batched"] for i in manifest["inputs"]] == ([True] * 4 if family == "sd3" else
                                                          [True, True, True, True, False, False])  # Flux's ids
    native = library_path().is_file()
    engines = [load_deepcache(tmp_path), *([load_deepcache(tmp_path, runtime="native")] if native else [])]
    assert all(engine.shape_ranges.batch == (1, 4) for engine in engines)
    scale = 1000 if family == "flux" else 1  # Flux's pipeline passes timesteps / 1000
    for rows in (1, 3):
        call = make_transformer_call(family, batch=rows)
        outs = []
        for module in (dc, *engines):
            module.reset()
            steps = []
            for t in (900, 800, 700):
                call["timestep"] = torch.full((rows,), t / scale)
                steps.append(module(**call).sample)
            outs.append(torch.stack(steps))
            assert module.history == "FSF"
        assert outs[1].shape[1] == rows
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        if native:
            assert torch.equal(outs[2], outs[1])
    with pytest.raises(ValueError, match="batch=5 is outside"):
        engines[0](**make_transformer_call(family, batch=5))
    if not native:
        return
    engine = engines[0]
    engine.reset()
    if family == "sd3":
        call = make_transformer_call("sd3", batch=1)
        scheduler.set_timesteps(6)
        x = call["hidden_states"]
        for t in scheduler.timesteps:
            velocity = engine(**{**call, "hidden_states": x, "timestep": t.expand(1)}).sample
            x = scheduler.step(velocity, t, x).prev_sample
        inputs = {"sample": call["hidden_states"], "encoder_hidden_states": call["encoder_hidden_states"],
                  "pooled_projections": call["pooled_projections"]}
        assert engine.history == "FSFSFS"
        runs = [(x, inputs)]
    else:  # one export, two image sizes: 16 and 48 tokens, each sampled as FluxPipeline sets it (mu per size)
        runs = [_flux_pipeline_latents(engine, scheduler, *size) for size in ((16, 16), (24, 32))]
    program = Path(__file__).parents[1] / "build" / "deepcache-generate"
    for x, inputs in runs:
        save_file(inputs, tmp_path / "in.safetensors")
        result = subprocess.run([str(program), str(tmp_path), str(tmp_path / "in.safetensors"),
                                 str(tmp_path / "out.safetensors"), "--steps", "6"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[1] == "FSFSFS"
        torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["sample"], x, rtol=1e-5, atol=1e-5)


def _flux_pipeline_latents(engine, scheduler, height: int = 16, width: int = 16) -> tuple[torch.Tensor, dict]:
    """FluxPipeline (height x width px, 6 steps, output_type="latent") with `engine` as its transformer: its final
    packed latents, and deepcache-generate's inputs made from what the pipeline passed the transformer at its first
    step (the initial noise as `sample`, text, pooled text and the token ids)."""
    pipe = diffusers.FluxPipeline(transformer=engine, scheduler=scheduler, vae=_vae(2), text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    engine.reset()
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, height // 4 * (width // 4), 8, generator=gen)  # VAE x2, then 2 x 2 packing
    calls, forward = [], engine.forward
    engine.forward = lambda *args, **kwargs: calls.append(kwargs) or forward(*args, **kwargs)
    with torch.no_grad():
        latents = pipe(prompt_embeds=torch.randn(1, 5, 12, generator=gen), num_inference_steps=6, height=height,
                       width=width, pooled_prompt_embeds=torch.randn(1, 10, generator=gen), latents=noise,
                       output_type="latent").images
    del engine.forward
    first = calls[0]
    assert len(calls) == 6 and torch.equal(first["hidden_states"], noise) and first["guidance"] is None
    assert engine.history == "FSFSFS"
    inputs = {"sample": noise, **{k: first[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids",
                                                         "txt_ids")}}
    return latents, inputs
