"""One compiled pair for many shapes: `compile_deepcache(..., dynamic=...)`."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.eval.sampling import ddim_loop
from deepcache_compile.shapes import ShapeRanges, shape_class

from conftest import make_call, make_unet

# (batch, height, width): batch 1 and CFG-like batches, square and not, three resolutions.
SHAPES = [(1, 8, 8), (2, 12, 8), (3, 16, 12), (2, 8, 20)]


@pytest.fixture(scope="module")
def sd():
    unet = make_unet("sd-mini")
    static = compile_deepcache(unet, branch=1, interval=3, max_signatures=len(SHAPES))
    calls = {shape: make_call(unet, batch=shape[0], height=shape[1], width=shape[2], seed=sum(shape))
             for shape in SHAPES}
    reference = {shape: ddim_loop(static, calls[shape], 5) for shape in SHAPES}
    return unet, calls, reference


def test_one_eager_pair_serves_every_shape_bitwise(sd):
    unet, calls, reference = sd
    dc = compile_deepcache(unet, branch=1, interval=3, dynamic=dict(batch=(1, 4), height=(8, 20), width=(8, 20)))
    for shape in SHAPES:
        assert torch.equal(ddim_loop(dc, calls[shape], 5), reference[shape]), shape
        assert dc.history == "FSSFS"
    assert len(dc.pairs) == 1 and dc.pairs[0].ranges == ShapeRanges((1, 4), (8, 20), (8, 20), 2)


def test_sizes_the_pair_cannot_serve_are_clear_errors_or_static_pairs(sd):
    unet, calls, reference = sd
    dc = compile_deepcache(unet, branch=1, dynamic=dict(batch=(1, 2), height=(8, 12), width=(8, 16)))
    with pytest.raises(ValueError, match=r"sample batch=3 is outside the dynamic pair's range 1..2: pass "
                                         r"dynamic=dict\(batch=\(1, 3\)\)"):
        dc(**calls[(3, 16, 12)])
    with pytest.raises(ValueError, match="width=20 is outside.*outside_ranges='static'"):
        dc(**calls[(2, 8, 20)])
    odd = make_call(unet, batch=1, height=8, width=9)
    with pytest.raises(ValueError, match="width=9 is not a multiple of 2"):
        dc(**odd)
    assert dc.pairs == ()  # nothing was compiled for the refused calls
    fallback = compile_deepcache(unet, branch=1, interval=3, dynamic=dict(batch=(1, 2)), outside_ranges="static")
    assert torch.equal(ddim_loop(fallback, calls[(3, 16, 12)], 5), reference[(3, 16, 12)])
    assert len(fallback.pairs) == 1 and fallback.pairs[0].ranges is None
    assert torch.equal(ddim_loop(fallback, calls[(1, 8, 8)], 5), reference[(1, 8, 8)])
    assert [p.ranges is None for p in fallback.pairs] == [False, True]  # the dynamic pair, and the static one


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        compile_deepcache(make_unet("sd-mini"), branch=1, dynamic=dict(size=(8, 16)))
    with pytest.raises(ValueError, match=r"dynamic\['batch'\]=\(4, 2\) is not a range"):
        compile_deepcache(make_unet("sd-mini"), branch=1, dynamic=dict(batch=(4, 2)))
    with pytest.raises(TypeError, match="pass True, False, or a dict"):
        compile_deepcache(make_unet("sd-mini"), branch=1, dynamic=(1, 8))


def test_shape_class_separates_what_a_dynamic_graph_fixes():
    sd15 = ((2, 4, 64, 64), (), (2, 77, 768))
    assert shape_class(sd15) == shape_class(((1, 4, 32, 48), (), (1, 77, 768)))
    assert shape_class(sd15) != shape_class(((2, 4, 64, 64), (), (2, 154, 768)))  # longer prompt: other graph
    assert shape_class(sd15) != shape_class(((2, 8, 64, 64), (), (2, 77, 768)))  # other channels
    residual = ((2, 4, 64, 64), (2, 320, 32, 32))
    assert shape_class(residual) == shape_class(((1, 4, 16, 24), (1, 320, 8, 12)))
    assert shape_class(residual) != shape_class(((1, 4, 16, 24), (1, 320, 16, 24)))  # not half the size


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
def test_compiled_dynamic_pair_compiles_once_for_every_shape(backend, monkeypatch):
    """One compilation of each graph serves three shapes within rounding of eager, and no shape compiles again."""
    pytest.importorskip("onnxruntime") if backend == "onnxruntime" else None
    unet = make_unet("ddpm-class")
    # Inductor at batch 1 is a second specialization (compiled ahead of time too): the onnxruntime case covers
    # batch 1, the inductor case (compiles are slow here) stays at batch >= 2.
    shapes = [(2, 16, 16), (1, 16, 16), (3, 32, 16)] if backend == "onnxruntime" else [(2, 16, 16), (3, 32, 16),
                                                                                        (4, 16, 24)]
    calls = [make_call(unet, batch=b, height=h, width=w, seed=b) for b, h, w in shapes]
    eager = compile_deepcache(unet, branch=1, interval=2)
    expected = [ddim_loop(eager, call, 3) for call in calls]
    compiles = []
    from deepcache_compile.runtime import pair as pair_module

    real = pair_module.get_backend

    def counting(name):
        compile_graph = real(name)

        def wrapper(gm, inputs, options, **shapes_):
            compiles.append(type(gm).__name__)
            return compile_graph(gm, inputs, options, **shapes_)
        return wrapper

    monkeypatch.setattr(pair_module, "get_backend", counting)
    dc = compile_deepcache(unet, branch=1, interval=2, backend=backend,
                           dynamic=dict(batch=(min(b for b, _, _ in shapes), 4), height=(16, 32), width=(16, 32)))
    dc.prepare(**calls[0])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for call, reference in zip(calls, expected):
        out = ddim_loop(dc, call, 3)
        assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no shape compiled anything again
    assert len(compiles) == 2 and len(dc.pairs) == 1


def test_dynamic_graphs_specialize_past_dynamos_limit_up_to_ours(monkeypatch):
    """The soak found dynamic Inductor graphs specializing per size region at batch 1 until dynamo's
    recompile_limit, then failing: they may now go on to SPECIALIZATION_LIMIT (real dynamo, a graph that
    guards on its size), and past that the error names the cause and the alternatives."""
    import torch._dynamo

    from deepcache_compile.runtime.backends import inductor

    def by_size(x):  # one specialization per length, as a size guard makes
        return x * x.shape[0]

    compiled = inductor._past_recompile_limit(torch.compile(by_size, fullgraph=True, dynamic=False))
    monkeypatch.setattr(inductor, "SPECIALIZATION_LIMIT", 4)
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in (1, 2, 3, 4, 1, 3):  # 4 specializations, two of them reused
            assert torch.equal(compiled(torch.ones(n)), torch.full((n,), float(n)))
        with pytest.raises(RuntimeError, match=r"specialized 4 times .*backend='onnxruntime' or backend='aoti'"):
            compiled(torch.ones(5))
