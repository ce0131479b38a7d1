"""Parity with the reference: output and every gradient, through the module, the net, fuse() and training.

Each case runs the fused module in the dtype under test and compares with the reference block computed in
float64 from the same parameters. Backends: ``torch`` (everywhere) and ``triton`` (the interpreter on CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    HAS_CUDA,
    RELU_TIE_BAND,
    assert_close,
    backend_choices,
    block_reference,
    float64_reference,
    run_with_grads,
    seeded_pair,
)

import fused_residual as fr

DEVICE = "cuda" if HAS_CUDA else "cpu"
HALF = (torch.float16, torch.bfloat16)
# (choice, dtype) pairs that make sense on this machine: every registered backend and each of its non-default
# kernel variants (e.g. triton:two_gemm), plus the plain composite; the interpreter has no bfloat16 and no fp64 dot.
CASES = [(c, d) for c in (*backend_choices(), "composite") for d in (torch.float64, torch.float32, *HALF)
         if not (d == torch.bfloat16 and not HAS_CUDA)
         and not (d == torch.float64 and c.startswith("triton"))
         and not (d in HALF and DEVICE == "cpu" and not c.startswith("triton"))]
CASE_IDS = [f"{c.replace(':', '-')}-{str(d).removeprefix('torch.')}" for c, d in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request, use_backend):
    choice, dtype = request.param
    use_backend(choice)
    return choice, dtype


def check_block(fused, x, dtype):
    """Output and every gradient of ``fused`` on ``x`` against the float64 reference (the plain module's, and
    the written-out math that settles ReLU ties), in ``dtype``."""
    x = x.to(dtype)
    dout = torch.randn(*x.shape[:-1], fused.out_features, device=x.device).to(dtype)
    out, grads = run_with_grads(fused, x, dout)
    assert out.dtype == dtype
    expected, expected_grads = block_reference(fused, x, dout)
    assert_close(out, expected, "out")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"grad {name}", scale=4)
    if dtype in (torch.float64, torch.float32):  # no ReLU ties to settle: the reference module decides alone
        module_out, module_grads = float64_reference(fused, x, dout)
        assert_close(out, module_out, "out vs reference module")
        for name, grad in grads.items():
            assert_close(grad, module_grads[name], f"grad {name} vs reference module", scale=4)


@pytest.mark.parametrize("rows,width", [(1, 1), (10, 10), (17, 48), (130, 33)])
def test_block_output_and_all_gradients(case, rows, width):
    _, dtype = case
    _, fused = seeded_pair(width, width, device=DEVICE, dtype=dtype)
    check_block(fused, torch.randn(rows, width, device=DEVICE), dtype)


def test_projection_block(case):
    _, dtype = case
    torch.manual_seed(0)
    fused = fr.FusedResidualBlock(12, 20, projection=True, device=DEVICE, dtype=dtype)
    check_block(fused, torch.randn(9, 12, device=DEVICE), dtype)


@pytest.mark.parametrize("shape", [(16,), (2, 3, 16), (2, 1, 3, 16)], ids=["1d", "3d", "4d"])
def test_any_number_of_leading_dims(case, shape):
    _, dtype = case
    _, fused = seeded_pair(16, 16, device=DEVICE, dtype=dtype)
    check_block(fused, torch.randn(*shape, device=DEVICE), dtype)


@pytest.mark.parametrize("layout", ["transposed", "strided_rows", "sliced_columns"])
def test_non_contiguous_inputs(case, layout):
    _, dtype = case
    _, fused = seeded_pair(24, 24, device=DEVICE, dtype=dtype)
    if layout == "transposed":
        x = torch.randn(24, 40, device=DEVICE).t()
    elif layout == "strided_rows":
        x = torch.randn(80, 24, device=DEVICE)[::2]
    else:
        x = torch.randn(40, 50, device=DEVICE)[:, 3:27]
    assert not x.is_contiguous()
    check_block(fused, x, dtype)


def test_input_is_never_mutated(case):
    _, dtype = case
    _, fused = seeded_pair(16, 16, device=DEVICE, dtype=dtype)
    x = torch.randn(8, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    fused(x).sum().backward()
    with torch.no_grad():
        fused(x)
    assert torch.equal(x.detach(), before)


def test_zero_size_batch_forward_and_backward(case):
    _, dtype = case
    reference, fused = seeded_pair(8, 8, device=DEVICE, dtype=dtype)
    x = torch.randn(0, 8, device=DEVICE, dtype=dtype, requires_grad=True)
    out = fused(x)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.count_nonzero(fused.linear1.weight.grad) == 0 and fused.linear2.bias.grad.shape == (8,)


def test_nan_and_inf_propagate_like_the_reference(case):
    _, dtype = case
    reference, fused = seeded_pair(8, 8, device=DEVICE, dtype=dtype)
    x = torch.randn(6, 8, device=DEVICE, dtype=dtype)
    x[1, 2], x[3, 0], x[4, 5] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    assert torch.equal(expected.isnan(), actual.isnan())
    assert torch.equal(expected.isposinf(), actual.isposinf())
    finite = expected.isfinite()
    assert_close(actual[finite], expected[finite].double(), "finite part")


def test_net_matches_reference(case):
    _, dtype = case
    torch.manual_seed(1)
    reference = fr.ResidualNet(5, 32, 3, 3).to(DEVICE)
    fused = fr.FusedResidualNet(5, 32, 3, 3, device=DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(21, 5, device=DEVICE)
    dout = torch.randn(21, 3, device=DEVICE)
    expected, expected_grads = float64_reference(reference, x, dout)
    out, grads = run_with_grads(fused.to(dtype), x.to(dtype), dout.to(dtype))
    assert_close(out, expected, "net out", scale=2)
    if dtype in HALF:
        return  # gradients in half precision: see check_block (ties); the block tests cover them
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"net grad {name}", scale=8)


def test_fuse_gives_the_same_model_output_and_gradients(case):
    _, dtype = case
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), fr.ResidualBlock(16, 16), torch.nn.ReLU(),
                                fr.ResidualBlock(16, 16)).to(DEVICE)
    x, dout = torch.randn(11, 6, device=DEVICE), torch.randn(11, 16, device=DEVICE)
    expected, expected_grads = float64_reference(model, x, dout)
    fr.fuse(model)
    out, grads = run_with_grads(model.to(dtype), x.to(dtype), dout.to(dtype))
    assert_close(out, expected, "fused model out", scale=2)
    if dtype in HALF:
        return
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"grad {name}", scale=8)


def test_optimizer_steps_track_the_reference(case):
    backend, dtype = case
    if dtype not in (torch.float64, torch.float32):
        pytest.skip("trajectories in half precision drift by design")
    torch.manual_seed(3)
    reference = fr.ResidualNet(6, 24, 4, 2).to(DEVICE, dtype)
    fused = fr.FusedResidualNet(6, 24, 4, 2, device=DEVICE, dtype=dtype)
    fused.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
    opt_fused = torch.optim.Adam(fused.parameters(), lr=1e-2)
    x, y = torch.randn(64, 6, device=DEVICE, dtype=dtype), torch.randn(64, 4, device=DEVICE, dtype=dtype)
    for _ in range(5):
        for model, opt in ((reference, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters(), strict=True):
        assert_close(p_fused, p_ref.double(), name, scale=20)


def test_single_layer_op_matches_its_definition(case):
    _, dtype = case
    torch.manual_seed(4)
    h = torch.randn(2, 13, 20, device=DEVICE, requires_grad=True)
    w = torch.randn(24, 20, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 13, 24, device=DEVICE, requires_grad=True)
    dout = torch.randn(2, 13, 24, device=DEVICE)
    inputs = [t.detach().double().requires_grad_(True) for t in (h, w, b, r)]
    expected = torch.relu(inputs[0] @ inputs[1].t() + inputs[2] + inputs[3])
    cast = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = fr.functional.linear_residual_relu(*cast)
    grads = torch.autograd.grad(out, cast, dout.to(dtype))
    assert_close(out, expected, "out", scale=2)
    # One ReLU, on the output: ties are settled by the op's own output, as in block_reference.
    band = RELU_TIE_BAND[dtype]
    pre = inputs[0] @ inputs[1].t() + inputs[2] + inputs[3]
    mask = torch.where(pre.abs() <= band, out.double() > 0, pre > 0)
    expected_grads = torch.autograd.grad(pre * mask, inputs, dout.double())
    for name, g, e in zip("hwbr", grads, expected_grads, strict=True):
        assert_close(g, e, f"grad {name}", scale=8)


def test_gradients_only_for_what_requires_them(case):
    _, dtype = case
    _, fused = seeded_pair(16, 16, device=DEVICE, dtype=dtype)
    fused.linear1.requires_grad_(False)
    x = torch.randn(5, 16, device=DEVICE, dtype=dtype)  # no grad for x either
    fused(x).sum().backward()
    assert fused.linear1.weight.grad is None and fused.linear1.bias.grad is None
    assert fused.linear2.weight.grad is not None and fused.linear2.bias.grad is not None


def test_deepcopy_behaves_the_same(case):
    _, dtype = case
    _, fused = seeded_pair(16, 16, device=DEVICE, dtype=dtype)
    x = torch.randn(5, 16, device=DEVICE, dtype=dtype)
    torch.testing.assert_close(copy.deepcopy(fused)(x), fused(x))


@pytest.mark.parametrize("hidden", [4, 40], ids=["narrower", "wider"])
def test_bottleneck_block_with_hidden_width_unlike_the_input(case, hidden):
    """w1 (hidden, in) with hidden != in: every route computes it (the whole-block kernels leave it to the
    two-GEMM path)."""
    _, dtype = case
    torch.manual_seed(5)
    fused = fr.FusedResidualBlock(16, 16, hidden_features=hidden, device=DEVICE, dtype=dtype)
    check_block(fused, torch.randn(11, 16, device=DEVICE), dtype)


def test_strided_and_broadcast_biases_are_read_through_their_strides(case):
    _, dtype = case
    torch.manual_seed(6)
    x, h, r = (torch.randn(9, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    w1, w2 = (0.3 * torch.randn(16, 16, device=DEVICE, dtype=dtype) for _ in range(2))
    b1 = torch.tensor(0.3, device=DEVICE, dtype=dtype).expand(16)  # stride 0
    b2 = torch.randn(32, device=DEVICE, dtype=dtype)[::2]  # stride 2
    d = [t.double() for t in (x, w1, b1, w2, b2)]
    expected = torch.relu(torch.relu(d[0] @ d[1].t() + d[2]) @ d[3].t() + d[4] + d[0])
    assert_close(fr.functional.residual_block(x, w1, b1, w2, b2), expected, "block", scale=2)
    expected = torch.relu(h.double() @ d[3].t() + d[4] + r.double())
    assert_close(fr.functional.linear_residual_relu(h, w2, b2, r), expected, "single layer", scale=2)
