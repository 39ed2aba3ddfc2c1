"""Block-range cuts on diffusers transformers (DiT, PixArt, SD3, Flux, Wan): found from the graph, full steps
equal to the model bitwise, cached steps equal to an eager hook reference, MAC shares equal to the blocks'
FlopCounterMode counts, and the drop-in wrapper on the eager and inductor backends."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deepcache_compile import compile_deepcache, list_branches
from deepcache_compile.calls import CallFlattener
from deepcache_compile.graph.blocks import find_blocks
from deepcache_compile.graph.cuts import CutNotFoundError, find_cuts
from deepcache_compile.graph.partition import split_at_branch, split_three

from conftest import TRANSFORMER_FAMILIES, make_transformer, make_transformer_call, trace
from reference_blocks import BlockCacheReference, blocks_of

# Blocks per family in the tiny configs (conftest.make_transformer), counted from the config, not the graph.
BLOCKS = {"dit": 4, "pixart": 4, "sd3": 4, "flux": 4, "wan": 3}


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_blocks_are_found_and_every_cut_splits_exactly(family):
    model = make_transformer(family)
    call = make_transformer_call(family)
    traced = trace(model, call)
    assert len(find_blocks(traced.gm)) == BLOCKS[family] == len(blocks_of(model))
    cuts = find_cuts(traced.gm)
    assert [c.index for c in cuts] == list(range(BLOCKS[family] - 1))
    inputs = traced.example_inputs
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0]
        for cut in cuts:
            assert cut.kind == "residual" and len(cut.streams) == 1
            split = split_at_branch(traced.gm, cut)
            sample, residual = split.full(*inputs)
            assert torch.equal(sample, expected), f"full graph differs from the model at cut {cut.index}"
            reference = BlockCacheReference(model, first=cut.index + 1)
            reference(True, **call)
            assert torch.equal(residual, reference.residual.reshape(residual.shape))
            other = make_transformer_call(family, seed=7, timestep=400)  # a cached step on new inputs
            other_inputs = trace_inputs(model, other)
            (shallow,) = split.shallow(*other_inputs, residual)
            torch.testing.assert_close(shallow, reference(False, **other), rtol=1e-5, atol=1e-6)
            three = split_three(traced.gm, cut)
            links = three.head(*other_inputs)
            assert torch.equal(three.tail(*other_inputs, *links, residual)[0], shallow)


def trace_inputs(model, call: dict) -> tuple[torch.Tensor, ...]:
    return CallFlattener(model)((), call).tensors


def _block_macs(model, call: dict) -> tuple[int, list[int]]:
    """MACs of one call and of each block, from FlopCounterMode's per-module counts (2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**call, return_dict=False)
    per_module = counter.get_flop_counts()
    names = [name for name, m in model.named_modules() if any(m is b for b in blocks_of(model))]
    block = [sum(per_module[f"{type(model).__name__}.{name}"].values()) // 2 for name in names]
    return counter.get_total_flops() // 2, block


@pytest.mark.parametrize("family", ["dit", "pixart", "flux"])
def test_mac_shares_are_the_computed_blocks_share(family):
    model, call = make_transformer(family), make_transformer_call(family, batch=1)
    total, block = _block_macs(model, call)
    rows = list_branches(model, **call)
    for row in rows:
        assert row.full_macs == total
        cached_blocks = sum(block[row.index + 1:])
        if family == "flux":  # the last computed dual block's text-stream work feeds only cached blocks: skipped too
            assert total - cached_blocks - block[row.index] < row.shallow_macs <= total - cached_blocks
        else:
            assert row.shallow_macs == total - cached_blocks, f"cut {row.index}"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_last_blocks_keep_one_residual_per_stream(family):
    model, call = make_transformer(family), make_transformer_call(family)
    traced = trace(model, call)
    cut = find_cuts(traced.gm, last_blocks=1)[0]
    assert len(cut.streams) == 2  # the image and the text stream both leave the range
    inputs = traced.example_inputs
    split = split_at_branch(traced.gm, cut)
    with torch.no_grad():
        sample, cache = split.full(*inputs)
        assert torch.equal(sample, model(**call, return_dict=False)[0])
        rows = {s.shape[1:] for s in cut.streams}
        assert cache.shape == (2, sum(torch.Size(r).numel() for r in rows))
        torch.testing.assert_close(split.shallow(*inputs, cache)[0], sample, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="last_blocks=3 is out of range"):
        find_cuts(traced.gm, last_blocks=3)


def test_a_model_without_skips_or_blocks_is_refused_naming_what_was_looked_for():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    gm = torch.export.export(model, (torch.randn(2, 4),)).module()
    with pytest.raises(CutNotFoundError, match="unet-skips.*transformer-blocks"):
        find_cuts(gm)


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_drop_in_runs_the_schedule_and_matches_the_reference(family):
    model = make_transformer(family)
    dc = compile_deepcache(model, branch=0, interval=3)
    reference = BlockCacheReference(model, first=1)
    for step in range(5):
        call = make_transformer_call(family, seed=step, timestep=900 - 100 * step)
        with torch.no_grad():
            out = dc(**call).sample
        torch.testing.assert_close(out, reference(step % 3 == 0, **call), rtol=1e-5, atol=1e-6)
    assert dc.history == "FSSFS"


# Sizes one dynamic pair serves in the resolution tests: latent (height, width), batch; non-square included.
SIZES = [(8, 8, 2), (12, 20, 2), (16, 8, 1), (24, 24, 3)]


def _sized_call(family: str, height: int, width: int, batch: int, seed: int, timestep: float) -> dict:
    """A call at latent size height x width; for Flux, the (height / 2) * (width / 2) tokens its pipeline packs."""
    call = make_transformer_call(family, batch=batch, seed=seed, timestep=timestep)
    gen = torch.Generator().manual_seed(seed)
    if family == "flux":
        tokens = height // 2 * (width // 2)
        call["hidden_states"] = torch.randn(batch, tokens, 8, generator=gen)
        call["img_ids"] = torch.randn(tokens, 3, generator=gen)
        return call
    frames = call["hidden_states"].shape[1:-2]
    call["hidden_states"] = torch.randn(batch, *frames, height, width, generator=gen)
    return call


@pytest.mark.parametrize("family, backend", [("pixart", "eager"), ("sd3", "eager"), ("wan", "eager"),
                                             ("flux", "eager"), ("pixart", "inductor"), ("pixart", "onnxruntime"),
                                             ("flux", "aoti")])
def test_one_pair_serves_a_range_of_resolutions(family, backend, monkeypatch):
    """dynamic=dict(height=..., width=...) (Flux: tokens=...): one trace and one compilation per graph serve every
    size in the ranges (the position tables computed from the size, the cached residual's token count `h * w / 4`
    or Flux's packed token count); full steps equal the model (bitwise on eager), cached steps the eager
    block-cache reference, and no size compiles again."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from deepcache_compile.runtime import pair as pair_module

    model = make_transformer(family)
    compiles, real = [], pair_module.get_backend
    monkeypatch.setattr(pair_module, "get_backend", lambda name: lambda gm, inputs, options, **kw: (
        compiles.append(type(gm).__name__), real(name)(gm, inputs, options, **kw))[1])
    sizes = dict(tokens=(4, 144)) if family == "flux" else dict(height=(4, 24), width=(4, 24))
    dc = compile_deepcache(model, branch=0, interval=2, backend=backend, dynamic=dict(batch=(1, 4), **sizes))
    reference = BlockCacheReference(model, first=1)
    graphs = None
    for i, (height, width, batch) in enumerate(SIZES):
        for step in range(2):
            call = _sized_call(family, height, width, batch, seed=i, timestep=900 - 100 * step)
            with torch.no_grad():
                out = dc(**call).sample
            expected = reference(step == 0, **call)
            if step == 0 and backend == "eager" and batch > 1:  # batch 1 of SD3 and Flux runs padded to 2 rows
                assert torch.equal(out, expected), (height, width, batch)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        assert dc.history == "FS"
        graphs = graphs or torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(compiles) == 2  # the full and the shallow graph, once
    if backend == "inductor":  # compiled ahead of time at batch >= 2 and batch 1; no size recompiled
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_model_that_fixes_its_size_in_python_is_refused_over_a_resolution_range():
    """DiT's output reshapes by the square root of the token count, which the trace keeps as a constant: the
    trace is checked at a second size and refused, naming the cause and the fix."""
    from deepcache_compile.graph.trace import UNetTraceError

    dc = compile_deepcache(make_transformer("dit"), branch=0, dynamic=dict(height=(4, 16), width=(4, 16)))
    with pytest.raises(UNetTraceError, match="square root.*Leave height/width out"):
        dc(**make_transformer_call("dit"))
    fixed = compile_deepcache(make_transformer("dit"), branch=0, dynamic=True)  # its one resolution: served
    with torch.no_grad():
        assert fixed(**make_transformer_call("dit")).sample.shape == (2, 8, 8, 8)


def test_a_range_past_a_cropped_position_table_is_refused():
    """SD3 crops its position table (16 patches of 2 in the tiny config: 32 latent pixels a side at most); the model
    raises past it, so a range past it is refused before tracing, naming the largest size."""
    dc = compile_deepcache(make_transformer("sd3"), branch=0, dynamic=dict(batch=(2, 4), height=(4, 48),
                                                                          width=(4, 32)))
    message = r"height=\(4, 48\) reaches past .*at most 32 latent pixels.*height=\(4, 32\)"
    with pytest.raises(ValueError, match=message):
        dc(**make_transformer_call("sd3"))


def test_traced_sizes_give_the_cache_shape_at_any_sample_size():
    """`TracedSizes` of a shallow graph traced over ranges: the residual's shape at another sample size, and in
    words, against the token count counted by hand (patch 2: (h / 2) * (w / 2) tokens of 16 channels)."""
    from deepcache_compile.calls import CallFlattener
    from deepcache_compile.graph.trace import trace_unet
    from deepcache_compile.shapes import ShapeRanges, TracedSizes

    model, call = make_transformer("sd3"), make_transformer_call("sd3")
    traced = trace_unet(model, CallFlattener(model)((), call), ShapeRanges((2, 4), (4, 24), (4, 24), 2))
    one = TracedSizes.of(split_at_branch(traced.gm, find_cuts(traced.gm)[0]).shallow)
    two = TracedSizes.of(split_at_branch(traced.gm, find_cuts(traced.gm, last_blocks=1)[0]).shallow)
    assert one.at((3, 4, 12, 20))[-1] == (3, 6 * 10, 16) and one.describe(4) == "[batch, height*width/4, 16]"
    assert two.at((3, 4, 12, 20))[-1] == (3, 6 * 10 * 16 + 5 * 16)  # image and text streams, one row each
    assert one.symbolic_dims()[1] == {0} and one.symbolic_dims()[4] == {0, 1}


def test_tensorrt_profiles_span_the_residual_token_counts():
    """The TensorRT engine file's optimization profile (written without TensorRT: shapes only) for a PixArt shallow
    program over 4-24 latent pixels a side: the cached residual from 2 x 2 to 12 x 12 tokens, the sample and text
    from the ranges' ends, opt at the example."""
    from deepcache_compile.artifacts.formats.tensorrt import profile
    from deepcache_compile.calls import CallFlattener
    from deepcache_compile.graph.trace import export_program, trace_unet
    from deepcache_compile.shapes import ShapeRanges

    model, call = make_transformer("pixart"), make_transformer_call("pixart")
    ranges = ShapeRanges((2, 4), (4, 24), (4, 24), 2)
    flat = CallFlattener(model)((), call)
    traced = trace_unet(model, flat, ranges)
    split = split_at_branch(traced.gm, find_cuts(traced.gm)[0])
    with torch.no_grad():
        cache = split.full(*flat.tensors)[1]
    program = export_program(split.shallow, (*flat.tensors, cache), ranges)
    shapes = profile(program, (*flat.names, "cache"), ranges)
    assert shapes["cache"] == ((2, 2 * 2, 16), (2, 4 * 4, 16), (4, 12 * 12, 16))
    assert shapes[flat.names[0]] == ((2, 4, 4, 4), (2, 4, 8, 8), (4, 4, 24, 24))
    assert shapes[flat.names[1]] == ((2, 5, 12), (2, 5, 12), (4, 5, 12))


def test_inductor_backend_runs_a_transformer():
    model = make_transformer("pixart")
    eager = compile_deepcache(model, branch=0, interval=2)
    compiled = compile_deepcache(model, branch=0, interval=2, backend="inductor")
    for step in range(3):
        call = make_transformer_call("pixart", seed=step, timestep=900 - 100 * step)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**call).sample, eager(**call).sample, rtol=1e-4, atol=1e-5)
    assert compiled.history == eager.history == "FSF"


def _step_calls(family: str, steps: int) -> list[dict]:
    """A denoising-like run: one call's inputs, the sample shrinking and the timestep falling a little per step."""
    base = make_transformer_call(family, seed=1, timestep=900)
    calls = []
    for step in range(steps):
        call = dict(base, hidden_states=base["hidden_states"] * (1 - 0.03 * step))
        call["timestep"] = base["timestep"] - (20 * step if family == "dit" else 0.02 * step)
        calls.append(call)
    return calls


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_first_block_refresh_decides_as_diffusers_first_block_cache(family):
    """The same threshold on the same model: diffusers' FirstBlockCache hooks and FirstBlockRefresh make the
    same full/cached decisions (their probe is block 0's residual, compared with the latest full step's) and
    the same outputs. Outputs agree to rounding, not bitwise: on full steps the three-graph split hands the tail
    the range's input plus its residual (out - in + in) where the hooked model uses the range's output."""
    import copy

    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    from deepcache_compile import FirstBlockRefresh

    model = make_transformer(family)
    calls, histories = _step_calls(family, 12), set()
    for threshold in (0.1, 0.2, 0.3):
        hooked = copy.deepcopy(model)
        apply_first_block_cache(hooked, FirstBlockCacheConfig(threshold=threshold))
        leader = hooked.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        dc = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(threshold=threshold))
        theirs = ""
        for call in calls:
            _set_cache_context(hooked, CacheContext("cond"))
            with torch.no_grad():
                expected = hooked(**call, return_dict=False)[0]
                out = dc(**call).sample
            theirs += "F" if leader.state_manager.get_state().should_compute else "S"
            _set_cache_context(hooked, None)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert dc.history == theirs, f"threshold {threshold}"
        histories.add(theirs)
    assert any("S" in h and h.count("F") > 1 for h in histories), f"{histories}: no run mixes the kinds of step"


def _run(dc, calls: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [dc(**call).sample for call in calls]


@pytest.mark.parametrize("policy", ["first-block", "adaptive"])
def test_step_split_decides_on_the_device_as_the_host_does(policy):
    """split="step": one graph per step, the decision a tensor inside it (torch.cond); the same decisions and,
    on the eager backend, the same outputs bitwise as the host-decided three-graph split."""
    from deepcache_compile import AdaptiveRefresh, FirstBlockRefresh

    rule = FirstBlockRefresh(0.2) if policy == "first-block" else AdaptiveRefresh(0.2, max_skip=3)
    model, calls = make_transformer("dit"), _step_calls("dit", 12)
    host = compile_deepcache(model, branch=0, refresh=rule)
    device = compile_deepcache(model, branch=0, refresh=rule, split="step")
    for expected, out in zip(_run(host, calls), _run(device, calls)):
        assert torch.equal(out, expected)
    assert len(device._states.current()._decided) == len(calls)  # no decision read on the host while running
    assert device.history == host.history and "S" in host.history and host.history.count("F") > 1
    again = _run(device, calls)  # a new generation (the timestep went up) starts from a fresh state
    assert device.history == host.history and torch.equal(again[-1], _run(host, calls)[-1])


def _host_reads(gm) -> list[str]:
    """The nodes of a graph module and its subgraphs (torch.cond branches) that read a tensor on the host."""
    reads = []
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            reads += [n.name for n in module.graph.nodes if n.op == "call_function"
                      and any(op in str(n.target) for op in ("_local_scalar_dense", "aten.item"))]
    return reads


def test_step_graph_exports_whole_with_no_host_read():
    from deepcache_compile import FirstBlockRefresh

    model, calls = make_transformer("dit"), _step_calls("dit", 2)
    dc = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.2), split="step")
    pair = dc.prepare(**calls[0])
    inputs = dc.flatten((), calls[0]).tensors
    example = (*inputs, *pair.device_step.initial_state(*inputs), torch.zeros((), dtype=torch.int64))
    program = torch.export.export(pair.device_step, example, strict=False)
    gm = program.module()
    assert any("cond" in str(n.target) for n in gm.graph.nodes), "the decision is not a torch.cond"
    assert _host_reads(gm) == []

    class HostRead(torch.nn.Module):  # the scan finds a host read where there is one
        def forward(self, x):
            return x * x.max().item()

    assert _host_reads(torch.export.export(HostRead(), (torch.ones(2),), strict=False).module()) != []


@pytest.mark.parametrize("backend", ["inductor", "aoti"])
def test_step_split_compiles_as_one_program(backend):
    from deepcache_compile import FirstBlockRefresh

    model, calls = make_transformer("dit"), _step_calls("dit", 12)
    host = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.2))
    compiled = compile_deepcache(model, branch=0, refresh=FirstBlockRefresh(0.2), split="step", backend=backend)
    for expected, out in zip(_run(host, calls), _run(compiled, calls)):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert compiled.history == host.history


def test_step_split_refuses_what_it_cannot_decide_on_the_device():
    from deepcache_compile import AdaptiveRefresh, DeepCacheConfig, FirstBlockRefresh

    with pytest.raises(ValueError, match="probe policy"):
        DeepCacheConfig(branch=0, split="step")
    with pytest.raises(ValueError, match="lagged"):
        DeepCacheConfig(branch=0, split="step", refresh=AdaptiveRefresh(lagged=True))
    with pytest.raises(ValueError, match="drop dynamic"):
        DeepCacheConfig(branch=0, split="step", refresh=FirstBlockRefresh(), dynamic=True)
    with pytest.raises(ValueError, match="drop forecast"):
        DeepCacheConfig(branch=0, split="step", refresh=FirstBlockRefresh(), forecast=True)
    dc = compile_deepcache(make_transformer("dit"), branch=0, refresh=FirstBlockRefresh(), split="step")
    with pytest.raises(ValueError, match="compiles its policy's rule"):
        dc.with_schedule(FirstBlockRefresh(0.3))
