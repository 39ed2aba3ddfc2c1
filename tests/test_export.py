"""Engine files: export, load without the model's code, dynamic shapes, tampering."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap

import re

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from deepcache_compile import ManifestError, compile_deepcache, load_deepcache
from deepcache_compile.eval.sampling import ddim_loop

from conftest import make_call, make_unet

# Stated per format, fp32, for the latents after a 10-step DDIM loop. pt2 runs the same aten graph as eager.
# ONNX Runtime and AOTInductor fuse and reorder float arithmetic: per call they differ by ~1e-6, and DDIM's
# x0 prediction divides by sqrt(alpha_bar_t) (~0.07 at t=999), so the loop amplifies that by up to ~14x a step.
TOLERANCE = {"pt2": dict(rtol=1e-5, atol=1e-5), "onnx": dict(rtol=5e-4, atol=5e-4),
             "aoti": dict(rtol=5e-4, atol=5e-4)}
INTERVAL, BRANCH = 3, 1


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per (format, architecture), made on first use and shared by the tests of this module."""
    made = {}

    def get(fmt, arch):
        if (fmt, arch) not in made:
            unet = make_unet(arch)
            dc = compile_deepcache(unet, branch=BRANCH, interval=INTERVAL)
            directory = tmp_path_factory.mktemp(f"{fmt}-{arch}")
            dc.export(directory, format=fmt, example=make_call(unet, batch=2, height=16, width=16),
                      batch=(1, 4), height=(8, 32), width=(8, 32))
            made[fmt, arch] = (dc, directory)
        return made[fmt, arch]

    return get


# AOTInductor exports are checked in test_native.py (the digits model, Python and C++ runtimes, vs eager).
@pytest.mark.parametrize("fmt, arch", [("pt2", "sd-mini"), ("onnx", "sd-mini"), ("onnx", "sdxl-mini")])
def test_loaded_pair_matches_eager_in_a_ddim_loop(exports, fmt, arch):
    dc, directory = exports(fmt, arch)
    engine = load_deepcache(directory)
    for batch, size in ((1, 16), (3, 8)):  # two resolutions, two batch sizes (1 included), one export
        call = make_call(dc.unet, batch=batch, height=size, width=size)
        expected, actual = ddim_loop(dc, call, 10), ddim_loop(engine, call, 10)
        torch.testing.assert_close(actual, expected, **TOLERANCE[fmt])
    assert engine.full_steps(10) == dc.full_steps(10)


def test_manifest_records_what_a_deployment_needs(exports):
    _, directory = exports("onnx", "sd-mini")
    manifest = json.loads((directory / "deepcache.json").read_text())
    assert manifest["branch"] == BRANCH and manifest["schedule"]["interval"] == INTERVAL
    assert [i["name"] for i in manifest["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert manifest["ranges"]["batch"] == [1, 4] and manifest["ranges"]["multiple"] == 2
    assert manifest["cache"] == {"channels": 32, "stride": 1, "dtype": "float32",
                                 "shape": "[batch, 32, height, width]"}  # in words of the sample's sizes
    assert manifest["unet"]["config"]["block_out_channels"] == [32, 64]
    assert set(manifest["sha256"]) == {"full.onnx", "full.onnx.data", "shallow.onnx", "shallow.onnx.data"}
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    # The shallow artifact holds only the weights it uses.
    assert manifest["sizes"]["shallow.onnx.data"] < manifest["sizes"]["full.onnx.data"] / 3


def _denoise(model, latents, ehs, steps=10):
    """A scheduler-free loop (the fresh process has no diffusers): x <- x - 0.1 * model(x, t), t from 999 down."""
    outputs = []
    for t in torch.linspace(999, 0, steps).long():
        outputs.append(model(latents, t, encoder_hidden_states=ehs).sample)
        latents = latents - 0.1 * outputs[-1]
    return torch.stack(outputs)


def test_fresh_process_loads_without_diffusers(exports, tmp_path):
    dc, directory = exports("pt2", "sd-mini")
    call = make_call(dc.unet, batch=2, height=16, width=16)
    dc.reset()
    expected = _denoise(dc, call["sample"], call["encoder_hidden_states"])
    save_file({"sample": call["sample"], "ehs": call["encoder_hidden_states"]}, tmp_path / "in.safetensors")
    script = textwrap.dedent("""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from deepcache_compile import load_deepcache
    """) + inspect.getsource(_denoise) + textwrap.dedent(f"""
        io = load_file({str(tmp_path / "in.safetensors")!r})
        engine = load_deepcache({str(directory)!r})
        save_file({{"outputs": _denoise(engine, io["sample"], io["ehs"])}}, {str(tmp_path / "out.safetensors")!r})
        print(engine.history)
        print(sorted(m for m in sys.modules if m.startswith(("diffusers", "deepcache_compile.graph",
                                                             "deepcache_compile.eval", "deepcache_compile.runtime.pair"))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-2000:]
    history, modules = result.stdout.strip().splitlines()[-2:]
    assert history == "FSSFSSFSSF" and modules == "[]", result.stdout
    actual = load_file(tmp_path / "out.safetensors")["outputs"]
    torch.testing.assert_close(actual, expected, **TOLERANCE["pt2"])


def test_engine_stands_in_for_pipe_unet(exports):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    dc, directory = exports("pt2", "sd-mini")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=dc,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1, 7, 32, generator=gen), torch.randn(1, 7, 32, generator=gen)

    def run():
        return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=5, height=16, width=16,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    expected = run()
    pipe.unet = load_deepcache(directory)
    torch.testing.assert_close(torch.from_numpy(run()), torch.from_numpy(expected), **TOLERANCE["pt2"])


def test_requests_outside_the_ranges_are_clear_errors(exports):
    dc, directory = exports("pt2", "sd-mini")
    engine = load_deepcache(directory)
    for kwargs, message in ((dict(batch=5), "batch=5 is outside"), (dict(height=40, width=16), "height=40"),
                            (dict(height=15, width=16), "not a multiple of 2")):
        batch = kwargs.pop("batch", 1)
        call = make_call(dc.unet, batch=batch, **(kwargs or dict(height=16, width=16)))
        with pytest.raises(ValueError, match=message):
            engine(**call)


def _copy(directory, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"), ("truncate", "truncated or replaced"), ("remove", "is missing"),
    ("version", "format_version=99"), ("manifest", "not valid JSON"),
])
def test_damaged_exports_are_refused(exports, tmp_path, damage, message):
    _, directory = exports("pt2", "sd-mini")
    target = _copy(directory, tmp_path)
    weights = target / "shallow.pt2"
    manifest = target / "deepcache.json"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "remove":
        weights.unlink()
    elif damage == "version":
        manifest.write_text(manifest.read_text().replace('"format_version": 2', '"format_version": 99'))
    else:
        manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ManifestError, match=message):
        load_deepcache(target)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_edited_ranges_in_the_manifest_are_refused(exports, tmp_path, fmt):
    """Each file holds the ranges it was compiled for; a manifest that declares others (here a smaller size
    multiple, which would let 12 px through graphs compiled for multiples of 4) is refused at load."""
    import json

    _, directory = exports(fmt, "sd-mini")
    target = _copy(directory, tmp_path)
    record = json.loads((target / "deepcache.json").read_text())
    multiple = record["ranges"]["multiple"]
    record["ranges"]["multiple"] = multiple // 2
    (target / "deepcache.json").write_text(json.dumps(record))
    compiled = (f'{{"batch":[1,4],"height":[8,32],"multiple":{multiple},"width":[8,32]}}')
    with pytest.raises(ManifestError, match=re.escape(
            f"full.{'pt2' if fmt == 'pt2' else 'onnx'}: compiled for the ranges {compiled}, deepcache.json declares "
            f'{{"batch":[1,4],"height":[8,32],"multiple":{multiple // 2},"width":[8,32]}}: the manifest was edited '
            "after export; export again")):
        load_deepcache(target)


def test_load_options_of_another_format_are_refused(exports):
    _, directory = exports("pt2", "sd-mini")
    with pytest.raises(ValueError, match=r"loading a pt2 export: options \['provider'\] are unknown"):
        load_deepcache(directory, provider="CUDAExecutionProvider")


def test_export_errors():
    unet = make_unet("sd-mini")
    dc = compile_deepcache(unet, branch=1)
    with pytest.raises(ValueError, match="nothing to export yet"):
        dc.export("/tmp/never", format="pt2")
    with pytest.raises(ValueError, match="format='trt' is unknown"):
        dc.export("/tmp/never", format="trt", example=make_call(unet))
    with pytest.raises(ValueError, match=r"the pt2 format: options \['fp16'\] are unknown; it takes no options"):
        dc.export("/tmp/never", format="pt2", example=make_call(unet), fp16=True)
    with pytest.raises(ValueError, match=r"height=\(8, 9\) is not a usable range"):
        dc.export("/tmp/never", format="pt2", example=make_call(unet, height=8, width=8), height=(8, 9))
    with pytest.raises(ValueError, match=r"height=\(16, 16\) is one size, and the example's height is 8"):
        dc.export("/tmp/never", format="pt2", example=make_call(unet, height=8, width=8), height=(16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
def test_tensorrt_engine_matches_eager(tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    unet = make_unet("sd-mini").cuda()
    dc = compile_deepcache(unet, branch=1, interval=3)
    call = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_call(unet, batch=2).items()}
    dc.export(tmp_path, format="tensorrt", example=call, batch=(1, 4), height=(8, 32), width=(8, 32))
    engine = load_deepcache(tmp_path, device="cuda")
    torch.testing.assert_close(ddim_loop(engine, call, 10), ddim_loop(dc, call, 10), rtol=1e-3, atol=1e-3)
