"""Backends against the eager reference, with tolerances stated per backend and dtype."""

from __future__ import annotations

import pytest
import torch

from deepcache_compile import compile_deepcache
from deepcache_compile.backends import available_backends, get_backend

from conftest import make_call, make_unet

# Inductor fuses and reorders fp32 arithmetic (and folds weights with freezing): rounding-level differences.
TOLERANCE = {("inductor", torch.float32): dict(rtol=1e-4, atol=1e-4)}


def test_registry():
    assert set(available_backends()) >= {"eager", "inductor"}
    with pytest.raises(ValueError, match="backend='tvm' is unknown"):
        get_backend("tvm")
    with pytest.raises(ValueError, match="backend='tvm' is unknown"):
        compile_deepcache(make_unet("ddpm-class"), branch=0, backend="tvm")


def test_bad_backend_options_are_refused():
    unet = make_unet("ddpm-class")
    dc = compile_deepcache(unet, branch=0, backend="inductor", backend_options={"modee": "max-autotune"})
    with pytest.raises(ValueError, match=r"options \['modee'\] are unknown"):
        dc(**make_call(unet))


@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_loop_matches_eager(backend):
    unet = make_unet("sd")
    call = make_call(unet, batch=2)
    ehs = call["encoder_hidden_states"]
    compiled = compile_deepcache(unet, branch=1, interval=2, backend=backend)
    eager = compile_deepcache(unet, branch=1, interval=2)
    for t in (900, 800, 700, 600, 500):  # full, shallow, full, shallow, full
        a = compiled(call["sample"], t, encoder_hidden_states=ehs).sample
        b = eager(call["sample"], t, encoder_hidden_states=ehs).sample
        torch.testing.assert_close(a, b, **TOLERANCE[(backend, torch.float32)])
