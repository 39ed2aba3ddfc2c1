"""The native runtime (kernels/): its C++ unit tests, the schedule against Python's, the C++ generation loop
and the TorchScript class against the Python engine on the same export, and its refusals of bad input."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepcache_compile import ManifestError, compile_deepcache, load_deepcache
from deepcache_compile.artifacts.manifest import cpu_isa, read_manifest
from deepcache_compile.artifacts.native import library_path, load_library
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.schedule import Calibration, Schedule, nonuniform_full_steps

ROOT = Path(__file__).parents[1]
BUILD = ROOT / "build"
pytestmark = pytest.mark.skipif(not library_path().is_file() or not (BUILD / "deepcache-generate").is_file(),
                                reason="the native runtime is not built: run `make native`")


def test_cpp_unit_tests_pass():
    result = subprocess.run(["ctest", "--test-dir", str(BUILD), "--output-on-failure"], capture_output=True,
                            text=True, timeout=120) if shutil.which("ctest") else \
        subprocess.run([str(BUILD / "test_runtime")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_generation_program_runs_without_python():
    linked = subprocess.run(["ldd", str(BUILD / "deepcache-generate")], capture_output=True, text=True).stdout
    assert "libtorch_cpu" in linked and "libpython" not in linked


def _manifest_json(schedule: Schedule) -> str:
    resolved = None
    if schedule.kind == "nonuniform":
        resolved = list(nonuniform_full_steps(schedule.num_inference_steps, schedule.interval, schedule.center,
                                              schedule.power))
    return json.dumps({"schedule": asdict(schedule), "nonuniform_full_steps": resolved})


def test_native_schedule_equals_python_schedule():
    load_library()
    reference = [Schedule("nonuniform", interval=5, num_inference_steps=50),
                 Schedule("nonuniform", interval=10, num_inference_steps=50)]
    assert [torch.ops.deepcache.full_steps(_manifest_json(s), 50) for s in reference] == \
           [[0, 5, 9, 13, 17, 21, 26, 31, 37, 43], [0, 9, 17, 26, 37]]  # docs/method.md
    # A calibrated plan is an explicit schedule with its calibration beside it: the native runtime runs it as is.
    plan = Schedule("explicit", steps=(0, 4, 7, 9), num_inference_steps=10,
                    calibration=Calibration(tuple(range(900, -100, -100)), (16, 16)))
    assert torch.ops.deepcache.full_steps(_manifest_json(plan), 10) == [0, 4, 7, 9]
    rng = random.Random(0)
    for _ in range(300):
        total = rng.randint(5, 120)
        first, last = rng.randint(0, 3), rng.randint(0, 3)
        kind = rng.choice(["uniform", "explicit", "nonuniform"])
        if kind == "explicit":
            s = Schedule("explicit", steps=(0, *sorted(rng.sample(range(1, total), min(5, total - 1)))),
                         always_full_first=first, always_full_last=last, num_inference_steps=total)
        else:
            try:
                s = Schedule(kind, interval=rng.randint(1, 10), num_inference_steps=total, always_full_first=first,
                             always_full_last=last, center=min(15, total // 3))
            except ValueError:  # no non-uniform schedule for these parameters
                continue
        assert torch.ops.deepcache.full_steps(_manifest_json(s), total) == s.full_steps(total), s


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """The shipped digits model, branch 0, N=3, exported to AOTInductor with its scheduler (~100 s here)."""
    unet, scheduler = load_digits_model()
    dc = compile_deepcache(unet, branch=0, interval=3)
    directory = tmp_path_factory.mktemp("digits-aoti")
    dc.export(directory, format="aoti", example={"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)},
              batch=(1, 32), height=(8, 32), width=(8, 32), scheduler=scheduler)
    return dc, scheduler, directory


def test_cpp_generation_equals_the_python_loop(digits_export, tmp_path):
    dc, scheduler, directory = digits_export
    noise = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    save_file({"sample": noise}, tmp_path / "in.safetensors")
    result = subprocess.run([str(BUILD / "deepcache-generate"), str(directory), str(tmp_path / "in.safetensors"),
                             str(tmp_path / "out.safetensors"), "--steps", "50", "--threads",
                             str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    native = load_file(tmp_path / "out.safetensors")["sample"]
    assert result.stdout.split() == ["history", "".join("F" if s % 3 == 0 else "S" for s in range(50))]
    # The same packages through the Python engine and diffusers' DDIMScheduler: only the scheduler's
    # arithmetic differs (ATen ops in C++, the same float32 formulas).
    python = ddim_loop(load_deepcache(directory), {"sample": noise}, 50, scheduler)
    torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-5)
    # Both against the eager DeepCacheUNet: AOTInductor's fused kernels differ by ~1e-6 a call, and DDIM
    # amplifies it (the same tolerance as test_export.py's for compiled formats).
    eager = ddim_loop(dc, {"sample": noise}, 50, scheduler)
    torch.testing.assert_close(python, eager, rtol=5e-4, atol=5e-4)
    torch.testing.assert_close(native, eager, rtol=5e-4, atol=5e-4)


def test_cpp_guidance_path_on_an_unconditional_model_changes_nothing(digits_export, tmp_path):
    """With classifier-free guidance the U-Net runs on the doubled batch and the halves are combined as
    u + g (c - u); on the unconditional digits model both halves are the same, so any g gives the plain result."""
    _, _, directory = digits_export
    save_file({"sample": torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))},
              tmp_path / "in.safetensors")
    outputs = []
    for guidance in ("1", "7.5"):
        out = tmp_path / f"out{guidance}.safetensors"
        result = subprocess.run([str(BUILD / "deepcache-generate"), str(directory), str(tmp_path / "in.safetensors"),
                                 str(out), "--steps", "10", "--guidance", guidance], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        outputs.append(load_file(out)["sample"])
    assert outputs[0].shape == (3, 1, 16, 16)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_native_engine_stands_in_for_pipe_unet(digits_export):
    from diffusers import DDIMPipeline

    _, scheduler, directory = digits_export
    images, histories = [], []
    for runtime in ("python", "native"):
        engine = load_deepcache(directory, runtime=runtime)
        pipe = DDIMPipeline(unet=engine, scheduler=scheduler)
        images.append(pipe(batch_size=4, num_inference_steps=10, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
        histories.append(engine.history)
    assert histories == ["FSSFSSFSSF"] * 2
    assert (images[0] == images[1]).all()  # the same packages on the same schedule: the same bits


def test_wrong_shapes_are_refused_as_in_python(digits_export):
    _, _, directory = digits_export
    native, python = load_deepcache(directory, runtime="native"), load_deepcache(directory)
    for shape, message in (((33, 1, 16, 16), "sample batch=33 is outside this export's range 1..32"),
                           ((1, 1, 10, 16), "sample height=10 is not a multiple of 4"),
                           ((1, 1, 16, 40), "sample width=40 is outside this export's range 8..32")):
        errors = []
        for engine in (native, python):
            with pytest.raises(ValueError, match=message) as err:
                engine(torch.randn(shape), 999)
            errors.append(str(err.value))
        assert errors[0] == errors[1]
    native.reset()
    native(torch.randn(2, 1, 16, 16), 999)
    assert native.history == "F" and native.step == 1  # after reset() the first step is full


def _damage(directory: Path, how: str) -> None:
    package, manifest = directory / "shallow.aoti.pt2", directory / "deepcache.json"
    record = json.loads(manifest.read_text())
    if how == "flip":
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package.write_bytes(bytes(data))
    elif how == "truncate":
        package.write_bytes(package.read_bytes()[:-10])
    elif how == "remove":
        package.unlink()
    elif how == "scheduler":
        (directory / "scheduler_config.json").write_text("{}")
    elif how == "version":
        manifest.write_text(json.dumps({**record, "format_version": 99}))
    elif how == "torch":
        manifest.write_text(json.dumps({**record, "versions": {**record["versions"], "torch": "2.0.0+cpu"}}))
    elif how == "isa":
        manifest.write_text(json.dumps({**record, "cpu_isa": ["amx_tile"]}))


@pytest.mark.parametrize("how, message", [
    ("flip", "shallow.aoti.pt2 does not match its sha256 in the manifest: the file was modified"),
    ("truncate", "shallow.aoti.pt2 has .* bytes, the manifest says .*: the file is truncated or replaced"),
    ("remove", "shallow.aoti.pt2 is missing: copy the whole export directory"),
    ("scheduler", "scheduler_config.json has .* bytes"),
    ("version", "has format_version=99; this deepcache_compile reads version 1"),
    ("torch", "aoti files were built with torch 2.0.0\\+cpu, this is 2.13"),
    ("isa", r"compiled for a CPU with \['amx_tile'\], which this CPU lacks"),
])
def test_damaged_exports_are_refused_from_cpp_with_the_python_messages(digits_export, tmp_path, how, message):
    if how == "isa" and "amx_tile" in cpu_isa():
        pytest.skip("this CPU has AMX: no instruction set to miss")
    _, _, directory = digits_export
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    _damage(target, how)
    with pytest.raises(ManifestError, match=message) as native:
        load_deepcache(target, runtime="native")
    with pytest.raises(ManifestError, match=message) as python:
        read_manifest(target)
    if how != "torch":  # the C++ side knows libtorch's release (2.13.0), Python the wheel's (2.13.0+cpu)
        assert str(native.value) == str(python.value)


def test_exports_calling_kernels_this_runtime_lacks_are_refused(digits_export, tmp_path):
    """An export whose packages call one of the project's ops that this build does not have (as a newer version's
    would) is refused before its packages load, by both runtimes, with the same message."""
    _, _, directory = digits_export
    assert read_manifest(directory)["native_ops"] == []  # fp32: nothing substituted
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    record = json.loads((target / "deepcache.json").read_text())
    (target / "deepcache.json").write_text(json.dumps({**record, "native_ops": ["deepcache::attention_fp4"]}))
    message = (f"{target}: the engines call deepcache::attention_fp4, which cannot run here: this runtime has no "
               "deepcache::attention_fp4")
    errors = []
    for runtime in ("native", "python"):
        with pytest.raises(ManifestError, match=re.escape(message)) as err:
            load_deepcache(target, runtime=runtime)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


def test_other_formats_and_missing_exports_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="deepcache.json is missing: not a deepcache_compile export"):
        load_deepcache(tmp_path, runtime="native")
    with pytest.raises(ValueError, match="runtime='rust' is unknown"):
        load_deepcache(tmp_path, runtime="rust")
