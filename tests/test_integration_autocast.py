"""Autocast: under ``torch.autocast`` the fused modules compute what the reference modules compute under it.

Same output dtype and gradient dtypes as the reference under the same autocast, and values within the autocast
dtype's tolerance of the exact math (float64, no autocast); the reference under autocast is held to the same
bound, so the bound means something.

A ReLU's gradient jumps at 0: in half precision a pre-activation within rounding of 0 lands on either side, in
the reference as much as in the fused block, and the gradients of a small net differ from the exact ones by
several percent in norm (bfloat16) for that reason alone. The block tests therefore use biases that keep every
pre-activation far from 0 (half the features always on, half always off) and compare gradients elementwise; the
net test compares gradients with the reference's by norm.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close, float64_reference, seeded_pair, to_reference
from fused_residual.kernels._common import interpreter_enabled

import fused_residual as fr
from fused_residual import dispatch

# (device, autocast dtype, backend): CPU autocast in bfloat16 with the torch backend; float16 with the Triton
# kernels in the interpreter (which has no bfloat16); CUDA in both half types with the default backend.
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
CASES = [
    pytest.param(("cpu", torch.bfloat16, "torch"), id="cpu-bf16-torch"),
    pytest.param(("cpu", torch.float16, "triton"), id="cpu-fp16-triton", marks=pytest.mark.skipif(
        not interpreter_enabled(), reason="CPU tensors run the Triton kernels only under TRITON_INTERPRET=1 "
        "(conftest sets it where there is no CUDA)")),
    pytest.param(("cuda", torch.float16, "auto"), id="cuda-fp16", marks=CUDA),
    pytest.param(("cuda", torch.bfloat16, "auto"), id="cuda-bf16", marks=CUDA),
]
# Relative error in norm allowed between the fused and the reference net's gradients under autocast.
NET_GRAD_NORM_RTOL = {torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@pytest.fixture(params=CASES)
def autocast_case(request, use_backend):
    device, dtype, backend = request.param
    use_backend(backend)
    return device, dtype


# Relative error in norm allowed for a gradient computed in half precision.
GRAD_NORM_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def run_autocast(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor, device: str, low: torch.dtype):
    """Forward under autocast, backward outside it (as the autocast docs recommend); output and grads by name."""
    xr = x.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=low):
        out = module(xr)
    out.backward(dout.to(out.dtype))
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def with_relu_margins(block: fr.FusedResidualBlock) -> fr.FusedResidualBlock:
    """Biases that put every ReLU input of ``block`` (for inputs of size < 1) far from 0: half the features
    on, half off, whatever the rounding."""
    sign = torch.ones(block.out_features, device=block.linear1.bias.device)
    sign[1::2] = -1
    with torch.no_grad():
        block.linear1.bias.copy_(2 * sign)
        block.linear2.bias.copy_(6 * sign)
    return block


def check_against_reference(reference, fused, x, dout, device, low, scale=1.0):
    """Output and gradients of ``fused`` and ``reference`` under autocast, both vs the exact float64 math."""
    expected, expected_grads = float64_reference(fused, x, dout)
    ref_out, ref_grads = run_autocast(reference, x, dout, device, low)
    out, grads = run_autocast(fused, x, dout, device, low)
    assert out.dtype == ref_out.dtype
    assert_close(ref_out, expected, "reference under autocast", dtype=low, scale=scale)
    assert_close(out, expected, "fused under autocast", dtype=low, scale=scale)
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype, name
        assert_close(ref_grads[name], expected_grads[name], f"reference grad {name}", dtype=low, scale=4 * scale)
        assert_close(grad, expected_grads[name], f"fused grad {name}", dtype=low, scale=4 * scale)
    return out


@pytest.mark.parametrize("x_dtype", [torch.float32, "low"], ids=["fp32_input", "low_input"])
def test_block_under_autocast_matches_the_reference_under_autocast(autocast_case, x_dtype):
    device, low = autocast_case
    _, fused = seeded_pair(32, 32, device=device)
    with_relu_margins(fused)
    torch.manual_seed(10)
    x = (0.3 * torch.randn(24, 32, device=device)).to(low if x_dtype == "low" else x_dtype)
    out = check_against_reference(to_reference(fused), fused, x, torch.randn(24, 32, device=device), device, low)
    # The seed block adds x in place into linear2's output: the autocast dtype, whatever x's dtype.
    assert out.dtype == low


def test_block_under_autocast_is_at_least_as_accurate_as_the_seed_block(autocast_case):
    """x far from 0 (100 + rand): rounding x to the autocast dtype before the add would cost ~0.5 there. The
    fused block adds the un-rounded x; its error against float32 math must not exceed the seed block's."""
    device, low = autocast_case
    reference, fused = seeded_pair(32, 32, device=device)
    torch.manual_seed(14)
    x = 100 + torch.rand(64, 32, device=device)
    with torch.no_grad():
        exact = reference.double()(x.double())
        reference.float()
        with torch.autocast(device, dtype=low):
            seed_out, fused_out = reference(x), fused(x)
    assert seed_out.dtype == fused_out.dtype == low
    seed_err = (seed_out.double() - exact).abs().max().item()
    fused_err = (fused_out.double() - exact).abs().max().item()
    assert fused_err <= seed_err, (fused_err, seed_err)
    # One rounding to the output dtype at most: half a unit in the last place of the largest output.
    assert fused_err <= 0.5 * torch.finfo(low).eps * exact.abs().max().item() * 2 + 1e-3, fused_err
    if dispatch.requested() == "torch" and device == "cpu":  # the same ops as the seed block: the same bits
        assert torch.equal(fused_out, seed_out)


def test_projection_block_under_autocast_stays_in_the_autocast_dtype(autocast_case):
    device, low = autocast_case
    torch.manual_seed(11)
    fused = with_relu_margins(fr.FusedResidualBlock(12, 20, projection=True, device=device))
    out = check_against_reference(to_reference(fused), fused, 0.3 * torch.randn(9, 12, device=device),
                                  torch.randn(9, 20, device=device), device, low)
    assert out.dtype == low  # linear2(h) + shortcut(x): the sum of two autocast outputs


def test_net_under_autocast_matches_the_reference_net(autocast_case):
    device, low = autocast_case
    torch.manual_seed(12)
    reference = fr.ResidualNet(6, 32, 4, 2).to(device)
    fused = fr.FusedResidualNet(6, 32, 4, 2, device=device)
    fused.load_state_dict(reference.state_dict())
    x, dout = torch.randn(17, 6, device=device), torch.randn(17, 4, device=device)
    expected, _ = float64_reference(fused, x, dout)
    ref_out, ref_grads = run_autocast(reference, x, dout, device, low)
    out, grads = run_autocast(fused, x, dout, device, low)
    assert out.dtype == ref_out.dtype == low  # the net ends with a linear
    assert_close(out, expected, "fused net under autocast", dtype=low, scale=2)
    for name, grad in grads.items():
        ref_grad = ref_grads[name].double()
        assert grad.dtype == ref_grads[name].dtype, name
        err = (grad.double() - ref_grad).norm().item()
        assert err <= NET_GRAD_NORM_RTOL[low] * ref_grad.norm().item(), f"grad {name}: {err:.3e}"


def test_single_layer_under_autocast_promotes_like_linear_plus_residual(autocast_case):
    device, low = autocast_case
    torch.manual_seed(13)
    h, w, b, r = (torch.randn(*s, device=device) for s in ((10, 16), (12, 16), (12,), (10, 12)))
    with torch.autocast(device, dtype=low):
        expected_dtype = (torch.nn.functional.linear(h, w, b) + r).dtype
        out = fr.functional.linear_residual_relu(h, w, b, r)
    assert out.dtype == expected_dtype == torch.float32
    exact = torch.relu(h.double() @ w.double().t() + b.double() + r.double())
    assert_close(out, exact, "out", dtype=low)


def test_float64_is_not_cast_by_autocast(use_backend):
    use_backend("torch")
    _, fused = seeded_pair(8, 8, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, fused(x))


def test_autocast_disabled_region_runs_in_the_input_dtype(use_backend):
    use_backend("torch")
    _, fused = seeded_pair(8, 8)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        out = fused(x)
    assert torch.equal(out, fused(x))


def test_low_precision_input_with_float32_weights_works_under_autocast_only(use_backend):
    use_backend("torch")
    reference, fused = seeded_pair(8, 8)
    x = torch.randn(5, 8).bfloat16()
    with pytest.raises(RuntimeError, match="same dtype"):
        fused(x)  # like nn.Linear without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = fused(x), reference(x)
    assert out.dtype == ref_out.dtype == torch.bfloat16


def test_compiled_block_under_autocast_matches_eager_under_autocast(use_backend):
    use_backend("torch")
    reference, fused = seeded_pair(16, 16)
    x = torch.randn(6, 16)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, ref_out = fused(x), reference(x)
        out = compiled(x)
    assert out.dtype == eager.dtype == ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager)


def test_compiling_under_autocast_calls_no_untraceable_autocast_check(use_backend, monkeypatch):
    """torch 2.11's Dynamo cannot trace torch.amp.is_autocast_available (it graph-breaks, so fullgraph=True
    raises). Make it untraceable here too: the compiled block must not call it."""
    use_backend("torch")
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    torch._dynamo.reset()
    _, fused = seeded_pair(16, 16)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(torch.randn(6, 16))
    assert out.dtype == torch.bfloat16
