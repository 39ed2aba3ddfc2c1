"""Feature-similarity analysis: the probe records DeepCache's cached tensors, and the suggestion rule."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile.eval.analyze import FeatureSimilarity, feature_similarity, probe_graph, suggest
from deepcache_compile.eval.digits import load_digits_model
from deepcache_compile.graph.branches import find_branches
from deepcache_compile.graph.partition import split_at_branch

from conftest import make_call, make_unet, trace


def test_probe_returns_the_tensors_deepcache_caches():
    unet = make_unet("sd-mini")
    traced = trace(unet, make_call(unet))
    branches = find_branches(traced.gm)
    with torch.no_grad():
        sample, *caches = probe_graph(traced.gm, branches)(*traced.example_inputs)
        for branch, cache in zip(branches, caches):
            full_sample, full_cache = split_at_branch(traced.gm, branch).full(*traced.example_inputs)
            assert torch.equal(cache, full_cache) and torch.equal(sample, full_sample)


@pytest.fixture(scope="module")
def digits_similarity():
    unet, scheduler = load_digits_model()
    return feature_similarity(unet, {"sample": torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))},
                              steps=20, scheduler=scheduler)


def test_similarity_matrices_are_cosine_similarities(digits_similarity):
    sim = digits_similarity
    assert sorted(sim.similarity) == list(range(9)) and len(sim.timesteps) == 20
    for s in sim.similarity.values():
        assert s.shape == (20, 20) and torch.allclose(s.diagonal(), torch.ones(20), atol=1e-5)
        assert torch.allclose(s, s.T, atol=1e-6) and s.max() <= 1 + 1e-5
    shares = [sim.mac_share[b] for b in range(9)]  # a deeper cut recomputes more: strictly more MACs
    assert shares == sorted(set(shares)) and shares[-1] < 1
    assert sim.reuse_similarity(0, 1) == 1.0  # interval 1: no shallow step
    for b in sim.similarity:  # caching longer means less similar features
        assert sim.reuse_similarity(b, 2) > sim.reuse_similarity(b, 5) > sim.reuse_similarity(b, 10)


def _synthetic(values: dict[int, float], shares: dict[int, float]) -> FeatureSimilarity:
    """Similarity decaying by `values[b]` per step apart."""
    steps = torch.arange(10.0)
    distance = (steps[:, None] - steps[None, :]).abs()
    return FeatureSimilarity(tuple(range(10)), {b: 1 - v * distance for b, v in values.items()}, shares)


def test_suggestion_is_the_fastest_choice_above_the_threshold():
    # Branch 0 (cheap) drifts 0.04 per step: N=2 keeps 0.96 at every shallow step (1.82x); at N=3 a third of the
    # steps see 0.92. Branch 1 (dearer) drifts 0.004: at N=10 the 10th percentile of 1 - 0.004 * (1..9) is
    # 1 - 0.004 * 8.2 = 0.9672, at 10 / (1 + 9 * 0.4) = 2.17x, the fastest choice that passes 0.95.
    sim = _synthetic({0: 0.04, 1: 0.004}, {0: 0.1, 1: 0.4})
    assert sim.reuse_similarity(0, 2) == pytest.approx(0.96) and sim.reuse_similarity(0, 3) == pytest.approx(0.92)
    pick = suggest(sim, intervals=(2, 3, 5, 10), threshold=0.95)
    assert (pick.branch, pick.interval) == (1, 10)
    assert pick.reuse_similarity == pytest.approx(0.9672) and pick.mac_speedup == pytest.approx(10 / 4.6)
    assert suggest(sim, intervals=(2, 3, 5, 10), threshold=0.97).branch == 1  # N=5: 1 - 0.004 * 4 = 0.984
    with pytest.raises(ValueError, match="lower the threshold"):
        suggest(_synthetic({0: 0.2}, {0: 0.1}))
