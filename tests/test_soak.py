"""The soak (`bench/soak.py` runs 1,000 generations) in short: random sizes, batch sizes, step counts and
schedules on a static and a dynamic pair of the digits model, threads on and off, NaN inputs mixed in."""

from __future__ import annotations

import pytest

from deepcache_compile.eval.soak import MAX_SIGNATURES, draw_jobs, run_soak


def test_jobs_cover_what_the_soak_promises():
    jobs = draw_jobs(400, ("eager", "eager-dynamic"), seed=0)
    assert {j.backend for j in jobs} == {"eager", "eager-dynamic"}
    assert {j.batch for j in jobs} == {1, 2, 3, 4} and len({(j.height, j.width) for j in jobs}) == 25
    assert {j.schedule.kind for j in jobs} == {"uniform", "nonuniform"} and 0 < sum(j.broken for j in jobs) < 20
    # More static signatures than the LRU holds, so that the soak evicts and compiles again.
    assert len({(j.batch, j.height, j.width) for j in jobs if j.backend == "eager"}) > MAX_SIGNATURES


@pytest.mark.filterwarnings("ignore")
def test_short_soak():
    report = run_soak(32, backends=("eager", "eager-dynamic"), seed=1, warmup=0.5, broken_share=0.1, progress=False)
    assert report.generations == 32 and report.threaded > 0 and report.broken_refused > 0
    assert report.mismatches == [] and report.errors == []
    assert report.most_pairs == {"eager": MAX_SIGNATURES, "eager-dynamic": 1}
    assert not [name for name in report.temp_left if name.startswith("deepcache")]
    # Memory growth is this machine's figure: bench/soak.py measures and reports it (docs/serving.md).


def test_dropped_pairs_release_what_torch_fx_cached():
    """Every GraphModule recompile caches its source in a process-wide table that torch never empties: dropped
    pairs must take theirs with them, or a server compiling pair after pair grows without bound."""
    import torch
    from torch.fx.graph_module import _loader

    from deepcache_compile import compile_deepcache

    from conftest import make_call, make_unet

    unet = make_unet("sd-mini")
    dc = compile_deepcache(unet, branch=1, max_signatures=1)
    before = len(_loader.eval_cache)
    dc.prepare(**make_call(unet, height=8, width=8))
    held = len(_loader.eval_cache)
    assert held > before
    dc.prepare(**make_call(unet, height=12, width=12))  # evicts the first pair
    assert len(_loader.eval_cache) == held  # one pair's worth, not two
    dc.recompile()
    assert len(_loader.eval_cache) == before
    assert torch.equal(dc(**make_call(unet, height=8, width=8)).sample, unet(**make_call(unet, height=8, width=8)).sample)


def test_dropped_pairs_leave_no_trace_state_alive():
    """Each torch.export trace makes a ShapeEnv and fake tensors that hold each other through C++ (invisible to
    the garbage collector) and through lru_caches keyed by the ShapeEnv: pair after pair through the LRU must not
    leave one more of them alive each time."""
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    from deepcache_compile import compile_deepcache
    from deepcache_compile.eval.digits import load_digits_model

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, FakeTensor) for o in gc.get_objects())

    timesteps = torch.tensor([999, 500, 10])  # as a pipeline passes them: views of the scheduler's timesteps

    def prepare(size: int) -> None:
        dc.prepare(sample=torch.randn(1, 1, size, size), timestep=timesteps[1])

    unet, _ = load_digits_model()
    dc = compile_deepcache(unet, branch=1, max_signatures=1)
    prepare(8)
    prepare(12)
    held = alive()
    assert held > 0  # the live pair's graphs carry fake tensors in their node metadata
    for size in (16, 8, 12):  # three more traces, each evicting the pair before it
        prepare(size)
    assert alive() <= held  # one pair's worth, not four


_CONVS_IN_THREADS = """
import sys, threading
import torch
from deepcache_compile.eval.memory import resident
if sys.argv[1] == "bounded":
    from deepcache_compile import bound_onednn_caches
    bound_onednn_caches(16)  # after importing torch, before the first convolution: as a server does
torch.set_num_threads(1)
conv = torch.nn.Conv2d(16, 16, 3, padding=1).eval()

def run(sizes):
    with torch.no_grad():
        for h, w in sizes:
            conv(torch.randn(2, 16, h, w))

sizes = [(h, w) for h in range(4, 24) for w in range(4, 24)]  # 400 shapes: one oneDNN primitive each
run(sizes[:20])
before = resident() / 2**20
threads = [threading.Thread(target=run, args=(sizes,)) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(resident() / 2**20 - before)
"""


def test_bounded_onednn_caches_stop_the_growth_that_many_shapes_cause():
    """The soak's memory growth was oneDNN's primitive caches (1,024 entries per thread) filling with shapes:
    400 convolution shapes in 2 threads grow the process by ~25 MB with the defaults and by ~2 MB bounded
    at 16 entries (fresh processes: the caches take their capacity when created)."""
    import subprocess
    import sys

    import os

    from deepcache_compile.runtime.onednn import _VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in _VARIABLES}  # run_soak, run before, sets them
    grown = {}
    for mode in ("default", "bounded"):
        out = subprocess.run([sys.executable, "-c", _CONVS_IN_THREADS, mode], capture_output=True, text=True,
                             timeout=300, check=True, env=env)
        grown[mode] = float(out.stdout.split()[-1])
    # Relative, not this machine's megabytes: bounded caches keep well under half of what the defaults hold.
    assert grown["bounded"] < grown["default"] / 2, grown


def test_bound_onednn_caches_refuses_nonsense():
    from deepcache_compile import bound_onednn_caches

    for bad in (0, -1, 2.5, True, "256"):
        with pytest.raises(ValueError, match="an int >= 1"):
            bound_onednn_caches(bad)
