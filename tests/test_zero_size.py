"""Zero-size dimensions on every path: 0 rows, hidden_features=0, in_features=0, out_features=0. nn.Linear
accepts them (with a warning at init), so the block computes them: outputs of the right shape, and the gradients
are zeros or the shortcut's, as float64 math written with plain ops says."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TRITON_INSTALLED, assert_close

import fused_residual as fr
from fused_residual.activations import ACTIVATIONS

ROUTES = ["torch", "composite", "auto"] + (["triton", "triton:two_gemm"] if TRITON_INSTALLED else [])

# (rows, in_features, hidden_features, out_features, projection)
SHAPES = [
    pytest.param((0, 8, 8, 8, False), id="0rows"),
    pytest.param((5, 8, 0, 8, False), id="hidden0"),
    pytest.param((5, 0, 0, 0, False), id="width0"),
    pytest.param((5, 0, 4, 5, True), id="in0-projection"),
    pytest.param((5, 4, 4, 0, True), id="out0-projection"),
    pytest.param((5, 4, 0, 6, True), id="hidden0-projection"),
    pytest.param((0, 4, 3, 6, True), id="0rows-projection"),
    pytest.param((5, 8, 3, 0, True), id="out0-bottleneck"),
]
FORMS = [pytest.param(("relu", "relu"), id="relu"), pytest.param(("gelu", None), id="gelu-ffn")]


def block_math64(block: fr.FusedResidualBlock, x: torch.Tensor, dout: torch.Tensor):
    p = {n: t.detach().double().requires_grad_(True) for n, t in block.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    h = ACTIVATIONS[block.activation].forward(x64 @ p["linear1.weight"].t() + p["linear1.bias"])
    shortcut = x64 @ p["shortcut.weight"].t() if block.projection else x64
    out = h @ p["linear2.weight"].t() + p["linear2.bias"] + shortcut
    if block.final_activation == "relu":
        out = torch.relu(out)
    out.backward(dout.double())
    grads = {"x": x64.grad}
    grads.update({n: t.grad for n, t in p.items()})
    return out.detach(), grads


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("route", ROUTES)
def test_zero_size_dimensions_forward_and_backward(use_backend, route, shape, form):
    use_backend(route)
    rows, i, h, o, projection = shape
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nn.Linear: "Initializing zero-element tensors is a no-op"
        block = fr.FusedResidualBlock(i, o, hidden_features=h, projection=projection, activation=form[0],
                                      final_activation=form[1])
    with torch.no_grad():
        for p in block.parameters():  # zero-element init is a no-op: give every parameter defined values
            p.copy_(torch.randn(p.shape))
    x, dout = torch.randn(rows, i), torch.randn(rows, o)
    expected, expected_grads = block_math64(block, x, dout)
    with torch.no_grad():
        assert_close(block(x), expected, "inference out")
    xr = x.clone().requires_grad_(True)
    for p in block.parameters():  # poisoned: a gradient left unwritten shows
        p.grad = None
    out = block(xr)
    assert_close(out, expected, "out")
    out.backward(dout)
    assert_close(xr.grad, expected_grads["x"], "grad x", scale=4)
    for name, p in block.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, expected_grads[name], f"grad {name}", scale=4)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rows,hidden", [(0, 6), (4, 0)], ids=["0rows", "hidden0"])
def test_zero_size_single_layer_and_net(use_backend, route, rows, hidden):
    use_backend(route)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = fr.FusedResidualNet(3, hidden, 2, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(rows, 3)
    p = {n: t.detach().double() for n, t in net.named_parameters()}
    a = torch.relu(x.double() @ p["linear1.weight"].t() + p["linear1.bias"])
    for b in range(2):
        w1, b1 = p[f"blocks.{b}.linear1.weight"], p[f"blocks.{b}.linear1.bias"]
        w2, b2 = p[f"blocks.{b}.linear2.weight"], p[f"blocks.{b}.linear2.bias"]
        a = torch.relu(torch.relu(a @ w1.t() + b1) @ w2.t() + b2 + a)
    expected = a @ p["linear2.weight"].t() + p["linear2.bias"]
    with torch.no_grad():
        assert_close(net(x), expected, "net out")
    h, w, b, r = torch.randn(rows, hidden), torch.randn(5, hidden), torch.randn(5), torch.randn(rows, 5)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fr.functional.linear_residual_relu(hr, wr, b, r)
    pre = h.double() @ w.double().t() + b.double() + r.double()
    assert_close(out, torch.relu(pre), "single layer out")
    dout = torch.randn(rows, 5)
    out.backward(dout)
    g = dout.double() * (pre > 0)
    assert_close(hr.grad, g @ w.double(), "single layer grad h")
    assert_close(wr.grad, g.t() @ h.double(), "single layer grad w")
