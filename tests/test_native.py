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
from deepcache_compile.eval.sampling import ddim_loop, sample_loop
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
    """The shipped digits model, branch 0, N=3 with forecast (the shallow package takes the extrapolation's slope
    and step count), exported to AOTInductor with its scheduler (~100 s here). The transformer test in
    test_transformer_pipelines.py runs a pair without forecast in C++."""
    unet, scheduler = load_digits_model()
    dc = compile_deepcache(unet, branch=0, interval=3, forecast=True)
    directory = tmp_path_factory.mktemp("digits-aoti")
    dc.export(directory, format="aoti", example={"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)},
              batch=(1, 32), height=(8, 32), width=(8, 32), scheduler=scheduler)
    return dc, scheduler, directory


def test_cpp_generation_equals_the_python_loop(digits_export, tmp_path):
    dc, scheduler, directory = digits_export
    assert read_manifest(directory)["forecast"] and read_manifest(directory)["inputs"][0]["name"] == "sample"
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


def _generate(directory: Path, inputs: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUILD / "deepcache-generate"), str(directory), str(inputs), str(out), *flags],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sampler, config, steps", [
    ("DDIMScheduler", {"timestep_spacing": "trailing"}, 16),  # the timesteps that need numpy's half-to-even
    ("EulerDiscreteScheduler", {}, 20),
    ("DPMSolverMultistepScheduler", {}, 25),  # DPM-Solver++ (2M), the common SD sampler
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "prediction_type": "epsilon"}, 12),
])
def test_cpp_samplers_equal_the_python_engine_with_diffusers(digits_export, tmp_path, sampler, config, steps):
    """deepcache-generate with another sampler's config (--scheduler) against the Python engine driving the same
    packages under diffusers' scheduler, in the loop diffusers' pipelines run (init_noise_sigma, scale_model_input)."""
    import diffusers

    _, scheduler, directory = digits_export
    reference = getattr(diffusers, sampler).from_config(scheduler.config, **config)
    reference.save_config(tmp_path)
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    save_file({"sample": noise}, tmp_path / "in.safetensors")
    result = _generate(directory, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", str(steps),
                       "--scheduler", str(tmp_path / "scheduler_config.json"))
    assert result.returncode == 0, result.stderr
    python = sample_loop(load_deepcache(directory), {"sample": noise}, steps, reference)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["sample"], python, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, tensors, message", [
    ([], {"sample"}, "--steps N \(1 or more\) is required"),
    (["--steps"], {"sample"}, "--steps needs a value"),
    (["--steps", "0"], {"sample"}, "--steps N \(1 or more\) is required"),
    (["--steps", "ten"], {"sample"}, "--steps ten is not a number"),
    (["--steps", "10", "--guidance"], {"sample"}, "--guidance needs a value"),
    (["--steps", "10", "--seed", "1"], {"sample"}, "unknown flag --seed"),
    (["--steps", "10"], {"noise"}, "in.safetensors has no tensor named sample \(the initial noise\); it holds noise"),
    (["--steps", "10"], {"sample", "encoder_hidden_states"},
     "in.safetensors holds encoder_hidden_states, which is not an input of this export"),
    (["--steps", "10", "--scheduler", "ddpm.json"], {"sample"}, "scheduler DDPMScheduler is not implemented in C\+\+"),
])
def test_the_generation_program_refuses_bad_input_by_name(digits_export, tmp_path, flags, tensors, message):
    """Every refusal exits non-zero, names the problem, and writes nothing."""
    from diffusers import DDPMScheduler

    _, _, directory = digits_export
    DDPMScheduler().save_config(tmp_path)
    (tmp_path / "scheduler_config.json").rename(tmp_path / "ddpm.json")
    save_file({name: torch.randn(2, 1, 16, 16) for name in tensors}, tmp_path / "in.safetensors")
    flags = [str(tmp_path / f) if f.endswith(".json") else f for f in flags]
    result = _generate(directory, tmp_path / "in.safetensors", tmp_path / "out.safetensors", *flags)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_calibrated_plans_are_checked_in_cpp_as_in_python(digits_export, tmp_path):
    """A calibrated plan runs where the generation fits it and is refused, with Python's messages, by the Python
    engine, the native engine and the program where it does not (another step count, another size)."""
    from diffusers import DDIMScheduler

    _, scheduler, directory = digits_export
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(10)
    plan = Schedule("explicit", steps=(0, 4, 7, 9), num_inference_steps=10,
                    calibration=Calibration(tuple(reference.timesteps.tolist()), (16, 16)))
    target = tmp_path / "planned"
    shutil.copytree(directory, target)
    record = json.loads((target / "deepcache.json").read_text())
    (target / "deepcache.json").write_text(json.dumps({**record, "schedule": asdict(plan)}))
    engines = [load_deepcache(target, runtime=runtime) for runtime in ("python", "native")]
    fits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    outputs = [ddim_loop(engine, {"sample": fits}, 10, scheduler) for engine in engines]
    assert [engine.history for engine in engines] == ["FSSSFSSFSF"] * 2
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    # Leading spacing over 1,000 steps: 12 steps start at 11 * (1000 // 12) = 913, the plan's 10 at 900.
    for steps, size, message in ((12, 16, "step 0 has timestep 913, the calibration run had 900: the plan was made "
                                  "for 10 steps of another schedule"),
                                 (10, 8, r"sample size \(8, 8\) differs from the calibration run's \(16, 16\)")):
        noise = torch.randn(2, 1, size, size)
        errors = []
        for engine in engines:
            engine.reset()
            with pytest.raises(ValueError, match=message) as err:
                ddim_loop(engine, {"sample": noise}, steps, scheduler)
            errors.append(str(err.value))
        assert errors[0] == errors[1]
        save_file({"sample": noise}, tmp_path / "in.safetensors")
        result = _generate(target, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", str(steps))
        assert result.returncode == 1 and f"deepcache-generate: {errors[0]}" in result.stderr, result.stderr
    # Past the plan's last step: a plan is never stretched.
    engines[1].reset()
    with pytest.raises(ValueError, match="runs more than the 10 steps the calibrated plan was made for"):
        for t in [*reference.timesteps, torch.tensor(0)]:
            engines[1](fits, t)


@pytest.mark.parametrize("runners", [1, 4])
def test_eight_concurrent_cpp_generations_in_one_engine_equal_their_runs_alone(digits_export, runners):
    """8 C++ threads, different batch sizes, resolutions, step counts and seeds, one engine (one copy of the
    weights): each result bitwise equal to its run alone, each history its own schedule's."""
    _, _, directory = digits_export
    result = subprocess.run([str(BUILD / "deepcache-concurrent"), str(directory), "check", str(runners)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("equal ") for line in lines), result.stdout
    steps = [int(line.split()[line.split().index("steps") + 1]) for line in lines]
    assert [line.split()[-1] for line in lines] == ["".join("F" if s % 3 == 0 else "S" for s in range(n))
                                                    for n in steps]


def test_native_engine_runs_concurrent_generations_as_the_python_engine_does(digits_export):
    """generation() blocks interleaved in one thread (asyncio tasks), and threads, each equal to its generation
    alone, with its own history, on one native engine."""
    import asyncio
    import threading

    from diffusers import DDIMScheduler

    _, scheduler, directory = digits_export
    native = load_deepcache(directory, runtime="native")
    jobs = [(1, 16, 7), (2, 12, 5), (3, 8, 6)]
    noises = {job: torch.randn(job[0], 1, job[1], job[1], generator=torch.Generator().manual_seed(job[0]))
              for job in jobs}
    alone = {job: ddim_loop(native, {"sample": noises[job]}, job[2], scheduler) for job in jobs}

    async def generate(job):
        steps = DDIMScheduler.from_config(scheduler.config)
        steps.set_timesteps(job[2])
        latents = noises[job]
        with native.generation():
            for t in steps.timesteps:
                latents = steps.step(native(latents, t).sample, t, latents).prev_sample
                await asyncio.sleep(0)  # let the other generations take a step
            return latents, native.history

    async def main():
        return await asyncio.gather(*(generate(job) for job in jobs))

    for job, (latents, history) in zip(jobs, asyncio.run(main())):
        assert torch.equal(latents, alone[job])
        assert history == "".join("F" if s % 3 == 0 else "S" for s in range(job[2]))
    results = {}
    threads = [threading.Thread(target=lambda job=job: results.__setitem__(
        job, ddim_loop(native, {"sample": noises[job]}, job[2], scheduler))) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[job], alone[job]) for job in jobs)


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
    ("version", "has format_version=99; this deepcache_compile reads version 2"),
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


def test_edited_ranges_are_refused_from_the_packages_themselves(digits_export, tmp_path):
    """The packages hold the ranges they were compiled for (AOTInductor package metadata): a manifest edited to
    accept sizes the packages were not compiled for (multiple 4 -> 2, batch up to 64) is refused by both
    runtimes and the program, before any shape runs, with one message."""
    _, _, directory = digits_export
    for edit in ({"multiple": 2}, {"batch": [1, 64]}):
        target = tmp_path / f"edited-{next(iter(edit))}"
        shutil.copytree(directory, target)
        record = json.loads((target / "deepcache.json").read_text())
        record["ranges"].update(edit)
        (target / "deepcache.json").write_text(json.dumps(record))
        declared = {"batch": [1, 32], "height": [8, 32], "multiple": 4, "width": [8, 32], **edit}
        message = (f'{target / "full.aoti.pt2"}: compiled for the ranges '
                   '{"batch":[1,32],"height":[8,32],"multiple":4,"width":[8,32]}, deepcache.json declares '
                   f'{json.dumps(declared, sort_keys=True, separators=(",", ":"))}: the manifest was edited after '
                   "export; export again")
        for runtime in ("python", "native"):
            with pytest.raises(ManifestError) as err:
                load_deepcache(target, runtime=runtime)
            assert str(err.value) == message
        save_file({"sample": torch.randn(1, 1, 10, 10)}, tmp_path / "in.safetensors")
        result = _generate(target, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", "2")
        assert result.returncode == 1 and message in result.stderr, result.stderr


def test_the_python_engine_runs_each_package_unpacked_once(digits_export, tmp_path, monkeypatch):
    """On the CPU the Python engine opens each package's model library from one unpacked copy per package file
    (AOTInductor's package loader extracts it again at every load): a second load reuses the copy, another file
    gets its own, and the results equal the package loader's bit for bit."""
    from deepcache_compile.artifacts.formats import RANGES_KEY, aoti

    _, scheduler, directory = digits_export
    full = directory / "full.aoti.pt2"
    library, metadata = aoti.unpacked_library(full)
    stamp = library.stat().st_mtime_ns
    assert aoti.unpacked_library(full)[0] == library and library.stat().st_mtime_ns == stamp  # reused as it is
    assert json.loads(metadata[RANGES_KEY])["batch"] == [1, 32]
    shutil.copy(full, tmp_path / "full.aoti.pt2")
    assert aoti.unpacked_library(tmp_path / "full.aoti.pt2")[0] != library
    opened = []
    monkeypatch.setattr(aoti, "unpacked_library", lambda path, real=aoti.unpacked_library: opened.append(path)
                        or real(path))
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    unpacked = ddim_loop(load_deepcache(directory), {"sample": noise}, 6, scheduler)
    assert sorted(p.name for p in opened) == ["full.aoti.pt2", "shallow.aoti.pt2"]
    monkeypatch.setattr(aoti, "unpacked_library", lambda path: None)  # the package loader (as on a GPU)
    assert torch.equal(ddim_loop(load_deepcache(directory), {"sample": noise}, 6, scheduler), unpacked)


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


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair made the documented way (the openssl command line)."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    return private, public


def _rewrite_manifest(directory: Path, **changes) -> None:
    """Recomputes the manifest's digests of the files as they are now (what someone who can write the directory
    can do), with `changes` applied."""
    from deepcache_compile.artifacts.manifest import sha256

    record = json.loads((directory / "deepcache.json").read_text())
    record["sha256"] = {name: sha256(directory / name) for name in record["sha256"]}
    record["sizes"] = {name: (directory / name).stat().st_size for name in record["sizes"]}
    (directory / "deepcache.json").write_text(json.dumps({**record, **changes}))


@pytest.fixture(scope="module")
def signed_exports(digits_export, tmp_path_factory):
    """Two signed copies of the digits export (the second with another scheduler config), the trusted key pair
    and another key pair."""
    from deepcache_compile.artifacts.signing import sign_manifest

    _, _, directory = digits_export
    root = tmp_path_factory.mktemp("signed")
    trusted, other = _keypair(root, "trusted"), _keypair(root, "other")
    first, second = root / "first", root / "second"
    shutil.copytree(directory, first)
    sign_manifest(first, trusted[0])
    shutil.copytree(directory, second)
    config = json.loads((second / "scheduler_config.json").read_text())
    (second / "scheduler_config.json").write_text(json.dumps({**config, "timestep_spacing": "trailing"}))
    _rewrite_manifest(second)
    sign_manifest(second, trusted[0])
    return first, second, trusted, other


def _tamper(how: str, target: Path, second: Path, other_private: Path) -> None:
    from deepcache_compile.artifacts.signing import sign_manifest

    if how == "unsigned":
        (target / "deepcache.json.sig").unlink()
    elif how == "other key":
        sign_manifest(target, other_private)
    elif how == "manifest edited":
        record = json.loads((target / "deepcache.json").read_text())
        record["ranges"]["multiple"] = 2  # would widen the sizes the packages accept
        (target / "deepcache.json").write_text(json.dumps(record, indent=2))
    elif how == "package changed, manifest recomputed":
        data = bytearray((target / "shallow.aoti.pt2").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (target / "shallow.aoti.pt2").write_bytes(bytes(data))
        _rewrite_manifest(target)
    elif how == "file swapped from another signed export":
        shutil.copy(second / "scheduler_config.json", target / "scheduler_config.json")
    elif how == "manifest swapped from another signed export":
        for name in ("deepcache.json", "deepcache.json.sig"):
            shutil.copy(second / name, target / name)
    elif how == "truncated signature":
        (target / "deepcache.json.sig").write_bytes((target / "deepcache.json.sig").read_bytes()[:-1])


@pytest.mark.parametrize("how, message", [
    ("unsigned", "deepcache.json.sig is missing: the export is not signed; export with sign_key="),
    ("other key", "deepcache.json.sig does not verify with any trusted key: the export was signed by another key, "
                  "or its manifest changed after signing"),
    ("manifest edited", "does not verify with any trusted key"),
    ("package changed, manifest recomputed", "does not verify with any trusted key"),
    ("file swapped from another signed export", "scheduler_config.json has .* bytes, the manifest says"),
    ("manifest swapped from another signed export", "scheduler_config.json has .* bytes, the manifest says"),
    ("truncated signature", "deepcache.json.sig has 63 bytes, an Ed25519 signature has 64"),
])
def test_signed_exports_refuse_tampering_in_both_runtimes_and_the_program(signed_exports, tmp_path, how, message):
    first, second, trusted, other = signed_exports
    target = tmp_path / "copy"
    shutil.copytree(first, target)
    _tamper(how, target, second, other[0])
    errors = []
    for runtime in ("python", "native"):
        with pytest.raises(ManifestError, match=message) as err:
            load_deepcache(target, runtime=runtime, trusted_keys=[trusted[1]])
        errors.append(str(err.value))
    assert errors[0] == errors[1]
    save_file({"sample": torch.randn(1, 1, 16, 16)}, tmp_path / "in.safetensors")
    result = _generate(target, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", "2",
                       "--trusted-key", str(trusted[1]))
    assert result.returncode == 1 and errors[0] in result.stderr, result.stderr


def test_signed_exports_load_with_a_trusted_key(signed_exports, tmp_path):
    first, _, trusted, other = signed_exports
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    outputs = [ddim_loop(load_deepcache(first, runtime=runtime, trusted_keys=[other[1], trusted[1]]),
                         {"sample": noise}, 4, None) for runtime in ("python", "native")]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    save_file({"sample": noise}, tmp_path / "in.safetensors")
    result = _generate(first, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", "4",
                       "--trusted-key", str(other[1]), "--trusted-key", str(trusted[1]))
    assert result.returncode == 0, result.stderr
    # Without trusted keys a signed export loads as any other (the signature is not required).
    assert load_deepcache(first).history == ""
    with pytest.raises(ValueError, match="trusted key .* is not an Ed25519 public key"):
        load_deepcache(first, runtime="native", trusted_keys=[trusted[0]])  # the private key file


def test_the_library_and_the_package_declare_one_format():
    """The C++ library declares the format version, file names and error kinds; the loader checked them at load."""
    load_library()
    from deepcache_compile.artifacts.manifest import FORMAT_VERSION
    from deepcache_compile.artifacts.native import _check_format

    declared = json.loads(torch.ops.deepcache.format_info())
    assert declared == {"format_version": FORMAT_VERSION, "manifest": "deepcache.json",
                        "signature": "deepcache.json.sig", "error_kinds": ["ManifestError"]}
    with pytest.raises(RuntimeError, match="rebuild it from this checkout"):
        _check_format({**declared, "format_version": FORMAT_VERSION + 1}, library_path())


@pytest.fixture(scope="module")
def adaptive_export(tmp_path_factory):
    """The digits model with adaptive refresh (branch 1), exported as head/deep/tail AOTInductor packages."""
    from deepcache_compile.refresh import AdaptiveRefresh

    unet, scheduler = load_digits_model()
    dc = compile_deepcache(unet, branch=1, refresh=AdaptiveRefresh(threshold=0.1, max_skip=5))
    directory = tmp_path_factory.mktemp("digits-adaptive")
    dc.export(directory, format="aoti", example={"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)},
              batch=(1, 8), height=(8, 32), width=(8, 32), scheduler=scheduler)
    return dc, scheduler, directory


def test_adaptive_refresh_exports_and_decides_the_same_in_every_runtime(adaptive_export, tmp_path):
    """The same decisions (history strings) from the eager three-graph DeepCacheUNet, the Python engine, the
    native engine and the C++ program; outputs within the compiled-format tolerance of eager, and the two
    runtimes on the same packages equal."""
    dc, scheduler, directory = adaptive_export
    assert json.loads((directory / "deepcache.json").read_text())["files"].keys() == {"head", "deep", "tail",
                                                                                        "scheduler"}
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    eager = ddim_loop(dc, {"sample": noise}, 25, scheduler)
    histories, outputs = [dc.history], []
    for runtime in ("python", "native"):
        engine = load_deepcache(directory, runtime=runtime)
        outputs.append(ddim_loop(engine, {"sample": noise}, 25, scheduler))
        histories.append(engine.history)
    save_file({"sample": noise}, tmp_path / "in.safetensors")
    result = _generate(directory, tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--steps", "25")
    assert result.returncode == 0, result.stderr
    histories.append(result.stdout.split()[1])
    assert len(set(histories)) == 1, histories
    assert 0 < histories[0].count("S") < 24 and "SSSSSS" not in histories[0]  # adaptive, max_skip=5 held
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["sample"], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0], eager, rtol=5e-4, atol=5e-4)
    with pytest.raises(ValueError, match="an engine's graphs belong to its kind of policy"):
        load_deepcache(directory).with_schedule(Schedule("uniform", interval=3))


def test_policies_the_engines_cannot_carry_are_refused_at_export(tmp_path):
    from deepcache_compile.refresh import AdaptiveRefresh

    unet, _ = load_digits_model()
    example = {"sample": torch.randn(2, 1, 16, 16), "timestep": torch.tensor(999)}
    for options in ({"refresh": AdaptiveRefresh(lagged=True)}, {"refresh": "adaptive", "forecast": True}):
        dc = compile_deepcache(unet, branch=1, **options)
        with pytest.raises(ValueError, match="runs in Python only"):
            dc.export(tmp_path, format="pt2", example=example)


def test_a_step_graph_export_decides_on_the_device_in_both_runtimes(tmp_path):
    """split="step" exports one AOTInductor package whose decision is a torch.cond; the Python and the native
    engine run it with the decisions of the eager host-decided split, and the same outputs."""
    from conftest import make_transformer
    from test_transformers import _step_calls

    from deepcache_compile import FirstBlockRefresh

    model, calls = make_transformer("dit"), _step_calls("dit", 12)
    host = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.2))
    dc = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.2), split="step")
    dc.export(tmp_path, format="aoti", example=calls[0], batch=(1, 4))
    manifest = json.loads((tmp_path / "deepcache.json").read_text())
    assert manifest["files"].keys() == {"step"} and manifest["policy"]["decided"] == "device"
    with torch.no_grad():
        expected = [host(**call).sample for call in calls]
        runs = {}
        for runtime in ("python", "native"):
            engine = load_deepcache(tmp_path, runtime=runtime)
            runs[runtime] = ([engine(**call).sample for call in calls], engine.history)
    assert runs["python"][1] == runs["native"][1] == host.history and "S" in host.history
    for a, b, c in zip(expected, runs["python"][0], runs["native"][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
