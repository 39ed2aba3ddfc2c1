"""The core invariant: in eager fp32, shallow(inputs, full(inputs).cache) == full(inputs) == U-Net, bitwise; and
the same for the three-graph split: tail(head, deep(head)) == U-Net, and tail on a cache == the shallow graph."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile.graph.branches import find_branches
from deepcache_compile.graph.partition import add_forecast, split_at_branch, split_three

from conftest import EXPECTED_SKIPS, controlnet_residuals, make_call, make_unet, trace


def _assert_exact_for_all_branches(unet, call):
    traced = trace(unet, call)
    inputs = traced.example_inputs
    with torch.no_grad():
        expected = unet(**call, return_dict=False)[0]
        branches = find_branches(traced.gm)
        for branch in branches:
            split = split_at_branch(traced.gm, branch)
            sample, cache = split.full(*inputs)
            assert torch.equal(sample, expected), f"full graph differs from the U-Net at branch {branch.index}"
            assert tuple(cache.shape) == branch.cache_shape
            (shallow,) = split.shallow(*inputs, cache)
            assert torch.equal(shallow, expected), f"shallow graph differs at branch {branch.index}"
            _assert_three_exact(traced.gm, branch, inputs, expected, split)
    return branches


def _assert_three_exact(gm, branch, inputs, expected, split):
    three = split_three(gm, branch)
    links = three.head(*inputs)
    (cache,) = three.deep(*inputs, *links)
    assert torch.equal(three.tail(*inputs, *links, cache)[0], expected), f"head/deep/tail differ at {branch.index}"
    other = cache * 0.5  # a shallow step on a cache of another step: tail == the two-graph shallow graph
    assert torch.equal(three.tail(*inputs, *links, other)[0], split.shallow(*inputs, other)[0])
    assert torch.equal(links[three.probe], _value_of(gm, inputs, branch.probe))


@pytest.mark.parametrize("arch", ["sd", "sd21", "sdxl", "ddpm", "ddpm-class"])
def test_shallow_equals_full_bitwise_for_every_branch(arch):
    unet = make_unet(arch)
    branches = _assert_exact_for_all_branches(unet, make_call(unet, batch=2))
    assert len(branches) == EXPECTED_SKIPS[arch]


def test_sd15_real_architecture_all_12_branches_bitwise(sd15_unet):
    branches = _assert_exact_for_all_branches(sd15_unet, make_call(sd15_unet, height=8, width=8))
    assert len(branches) == 12


def test_controlnet_style_call_all_branches_bitwise():
    unet = make_unet("sd")
    call = make_call(unet)
    call.update(controlnet_residuals(unet, call))
    assert len(_assert_exact_for_all_branches(unet, call)) == 12


def test_graphs_share_the_unets_parameters():
    unet = make_unet("sd")
    traced = trace(unet, make_call(unet))
    split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
    originals = {id(p) for p in unet.parameters()}
    for gm in (split.full, split.shallow):
        assert {id(p) for p in gm.parameters()} <= originals
    assert len(list(split.shallow.parameters())) < len(list(split.full.parameters()))


def test_shallow_graph_computes_nothing_deep():
    unet = make_unet("sd")
    traced = trace(unet, make_call(unet))
    split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
    stacks = [str(n.meta.get("nn_module_stack", {})) for n in split.shallow.graph.nodes]
    for deep in ("mid_block", "down_blocks.1", "up_blocks.0", "up_blocks.1", "up_blocks.2"):
        assert not any(deep in s for s in stacks), f"shallow graph still runs {deep}"
    targets = [n.target for n in split.shallow.graph.nodes if n.op == "call_function"]
    # The transformers above branch 1 remain: down_blocks.0.attentions.0 and up_blocks.3.attentions.1 and .2,
    # each one self- and one cross-attention: 6 SDPA calls (the full graph has 2*3 + 3*3 + 1 = 16 transformers).
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert targets.count(sdpa) == 6
    full_targets = [n.target for n in split.full.graph.nodes if n.op == "call_function"]
    assert full_targets.count(sdpa) == 2 * 16
    assert torch.ops.aten._assert_tensor_metadata.default not in targets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_unets_split_exactly(dtype):
    unet = make_unet("sd", dtype)
    branches = _assert_exact_for_all_branches(unet, make_call(unet))
    assert all(b.cache_dtype == dtype for b in branches)


def test_timestep_cond_input_lcm_style():
    cls, config = __import__("conftest").TINY_CONFIGS["sd"]
    torch.manual_seed(0)
    unet = cls(**config, time_cond_proj_dim=8).eval()
    call = {**make_call(unet), "timestep_cond": torch.randn(1, 8)}
    assert len(_assert_exact_for_all_branches(unet, call)) == 12


def _value_of(gm, inputs, name):
    """The value of node `name` of the traced graph, by running the graph with that node as an extra output."""
    from deepcache_compile.eval.analyze import probe_graph
    from types import SimpleNamespace

    return probe_graph(gm, (SimpleNamespace(streams=(SimpleNamespace(node=name),)),))(*inputs)[1]


def test_three_graphs_run_each_layer_once_and_share_the_weights():
    unet = make_unet("sd")
    traced = trace(unet, make_call(unet))
    branch = find_branches(traced.gm)[1]
    three, split = split_three(traced.gm, branch), split_at_branch(traced.gm, branch)

    def computing(gm):
        return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]

    head, deep, tail = (computing(g) for g in (three.head, three.deep, three.tail))
    # Every node the U-Net's output needs (the full graph: the traced graph without its dead assertion nodes)
    # lands in exactly one part.
    assert sorted(head + deep + tail) == sorted(computing(split.full))
    assert sorted(head + tail) == sorted(computing(split.shallow))  # a shallow step: exactly the shallow graph
    assert not set(head) & set(deep) and not set(deep) & set(tail)
    originals = {id(p) for p in unet.parameters()}
    for gm in (three.head, three.deep, three.tail):
        assert {id(p) for p in gm.parameters()} <= originals


def test_forecast_graph_reads_the_extrapolated_cache():
    unet = make_unet("sd")
    traced = trace(unet, make_call(unet))
    split = split_at_branch(traced.gm, find_branches(traced.gm)[1])
    forecast = add_forecast(split.shallow)
    inputs = traced.example_inputs
    with torch.no_grad():
        _, cache = split.full(*inputs)
        slope, steps = torch.randn_like(cache), torch.tensor(3.0)
        expected = split.shallow(*inputs, cache + slope * steps)[0]
        assert torch.equal(forecast(*inputs, cache, slope, steps)[0], expected)
        assert torch.equal(forecast(*inputs, cache, slope, torch.tensor(0.0))[0], split.shallow(*inputs, cache)[0])
