"""FusedResidualNet in inference: one whole-net kernel where the widths allow, layer after layer elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

import fused_residual as fr
from fused_residual import backends

DEVICE = "cuda" if HAS_CUDA else "cpu"
CASES = [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16)]


def make_pair(in_features, hidden, out_features, blocks, dtype, seed=0):
    torch.manual_seed(seed)
    reference = fr.ResidualNet(in_features, hidden, out_features, blocks).to(DEVICE)
    fused = fr.FusedResidualNet(in_features, hidden, out_features, blocks, device=DEVICE).to(dtype)
    fused.load_state_dict(reference.state_dict())
    return reference.to(dtype), fused


def float64_out(reference, x):
    with torch.no_grad():
        return reference.double()(x.double())


@pytest.mark.parametrize("backend,dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(5, 10, 2, 2), (3, 64, 7, 8), (17, 48, 33, 3), (8, 16, 8, 0), (4, 100, 6, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_inference_matches_reference(use_backend, backend, dtype, shape):
    use_backend(backend)
    in_features, hidden, out_features, blocks = shape
    reference, fused = make_pair(*shape, dtype)
    x = torch.randn(37, in_features, device=DEVICE).to(dtype)
    with torch.no_grad():
        y = fused(x)
    assert y.dtype == dtype and y.shape == (37, out_features)
    assert_close(y, float64_out(reference, x), "y", scale=1 + blocks)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leading_dims_non_contiguous_and_inference_mode(use_backend, backend):
    use_backend(backend)
    reference, fused = make_pair(6, 32, 3, 2, torch.float32)
    x = torch.randn(2, 5, 12, device=DEVICE)[..., ::2]
    with torch.inference_mode():
        y = fused(x)
    assert y.shape == (2, 5, 3)
    assert_close(y, float64_out(reference, x), "y", scale=3)


def count_net_launches(monkeypatch):
    from fused_residual.kernels import _launch

    before = _launch.launch_counts().get("whole_net_forward_kernel", 0)
    return lambda: _launch.launch_counts().get("whole_net_forward_kernel", 0) - before


@pytest.mark.skipif(backends.missing_requirement("triton") is not None, reason="needs triton")
def test_one_launch_for_the_whole_net_when_widths_fit(use_backend, monkeypatch):
    use_backend("triton")
    launches = count_net_launches(monkeypatch)
    _, fused = make_pair(5, 64, 2, 8, torch.float16)
    with torch.no_grad():
        fused(torch.randn(20, 5, device=DEVICE, dtype=torch.float16))
    assert launches() == 1
    _, wide = make_pair(5, 200, 2, 2, torch.float16)  # hidden 200 pads to 256: layer after layer
    with torch.no_grad():
        wide(torch.randn(20, 5, device=DEVICE, dtype=torch.float16))
    assert launches() == 1


def test_training_and_autocast_take_the_per_block_path(use_backend, monkeypatch):
    use_backend("torch")
    _, fused = make_pair(5, 16, 2, 2, torch.float32)
    calls = []
    monkeypatch.setattr(fr.plans, "run_net_inference", lambda *a: calls.append(1))
    fused(torch.randn(4, 5, device=DEVICE)).sum().backward()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        fused(torch.randn(4, 5, device=DEVICE))
    assert calls == []
    with torch.no_grad():
        fused(torch.randn(4, 5, device=DEVICE))
    assert calls == [1]


def test_bad_input_errors_like_the_reference():
    _, fused = make_pair(5, 16, 2, 2, torch.float32)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="last dimension 4"):
            fused(torch.randn(3, 4, device=DEVICE))
        with pytest.raises(RuntimeError, match="torch.float64 and torch.float32"):
            fused(torch.randn(3, 5, device=DEVICE, dtype=torch.float64))
