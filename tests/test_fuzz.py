"""Hypothesis fuzzing of shapes, dtypes and strides against the reference (torch backend)."""

from __future__ import annotations

import os

import torch
from conftest import assert_close, float64_reference, run_with_grads, seeded_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def block_inputs(draw):
    width = draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    seed = draw(st.integers(0, 2**16))
    return width, tuple(lead), dtype, layout, seed


def make_input(shape, layout, generator):
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).transpose(-1, -2)
    if layout == "strided":
        return torch.randn(*shape[:-1], shape[-1] * 2, generator=generator)[..., ::2]
    if layout == "expanded" and len(shape) >= 2:
        return torch.randn(*shape[:-2], 1, shape[-1], generator=generator).expand(shape)
    return torch.randn(*shape, generator=generator)


@given(block_inputs())
def test_fuzz_block_matches_reference(use_backend, params):
    use_backend("torch")
    width, lead, dtype, layout, seed = params
    generator = torch.Generator().manual_seed(seed)
    _, fused = seeded_pair(width, width, seed=seed, dtype=dtype)
    x = make_input((*lead, width), layout, generator).to(dtype)
    dout = torch.randn(*lead, width, generator=generator)
    expected, expected_grads = float64_reference(fused, x, dout)
    out, grads = run_with_grads(fused, x, dout.to(dtype))
    assert_close(out, expected, "out")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"grad {name}", scale=4)
