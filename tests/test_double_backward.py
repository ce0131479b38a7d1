"""Backward passes that build a graph: gradient penalties, double backward, torch.func transforms.

The reference supports them, so the fused block must give the same second-order gradients on every route
(each registered backend and variant, and the plain composite). Expected values come from the reference module
in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close, backend_choices
from torch.func import functional_call, grad, jacrev, vmap

import fused_residual as fr
from fused_residual.activations import ACTIVATIONS, FINAL_ACTIVATIONS

DEVICE = "cuda" if HAS_CUDA else "cpu"
CHOICES = [*backend_choices(), "composite"]
# Activations with a second derivative (the registry's not piecewise_linear), with each final activation.
CURVED_FORMS = [(name, final) for name, act in ACTIVATIONS.items() if not act.piecewise_linear
                for final in FINAL_ACTIVATIONS]


def pair(width=16, seed=0, **kwargs):
    torch.manual_seed(seed)
    fused = fr.FusedResidualBlock(width, width, device=DEVICE, **kwargs)
    reference = fr.ResidualBlock(width, width).to(DEVICE).double()
    if not kwargs:
        reference.load_state_dict(fused.state_dict())
    return reference, fused


def penalty_loss(model, x, wrt_x=True):
    """``sum(y) + |d sum(y^2) / d x|^2``: a gradient penalty, whose backward differentiates a backward."""
    x = x.detach().clone().requires_grad_(wrt_x)
    y = model(x)
    targets = [x] if wrt_x else [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.pow(2).sum(), targets, create_graph=True)
    return y.sum() + sum(g.pow(2).sum() for g in grads), x


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("wrt_x", [True, False], ids=["penalty_on_dx", "penalty_on_dW"])
def test_gradient_penalty_matches_the_reference(use_backend, choice, wrt_x):
    use_backend(choice)
    reference, fused = pair()
    x = torch.randn(10, 16, device=DEVICE, dtype=torch.float64)
    for model, xin in ((reference, x), (fused, x.float())):
        loss, _ = penalty_loss(model, xin, wrt_x)
        loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        expected = ref_params[name].grad
        assert p.grad is not None, name
        assert_close(p.grad, expected, f"grad {name}", scale=20)


@pytest.mark.parametrize("choice", CHOICES)
def test_penalty_through_frozen_weights_reaches_the_input(use_backend, choice):
    """Only x needs a gradient: the block keeps no x (ReLU), and the second-order term comes from its masks."""
    use_backend(choice)
    reference, fused = pair(seed=1)
    for m in (reference, fused):
        m.requires_grad_(False)
    x = torch.randn(9, 16, device=DEVICE, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    xf = x.float().requires_grad_(True)
    for model, xin in ((reference, xr), (fused, xf)):
        y = model(xin)
        (g,) = torch.autograd.grad((y * y.detach().sign()).pow(2).sum(), xin, create_graph=True)
        (g.pow(2).sum() + y.sum()).backward()
    assert_close(xf.grad, xr.grad, "x grad", scale=20)


@pytest.mark.parametrize("choice", CHOICES)
def test_torch_func_grad_jacrev_and_vmap_match_the_reference(use_backend, choice):
    use_backend(choice)
    reference, fused = pair(seed=2)
    x = torch.randn(6, 16, device=DEVICE, dtype=torch.float64)

    def loss(model, params, inp):
        return functional_call(model, params, (inp,)).pow(2).sum()

    fused_params = {k: v.detach() for k, v in fused.named_parameters()}
    ref_params = {k: v.detach() for k, v in reference.named_parameters()}
    got = grad(lambda p: loss(fused, p, x.float()))(fused_params)
    expected = grad(lambda p: loss(reference, p, x))(ref_params)
    for name in got:
        assert_close(got[name], expected[name], f"func.grad {name}", scale=10)
    assert_close(jacrev(fused)(x[:3].float()), jacrev(reference)(x[:3]), "jacrev", scale=4)
    assert_close(vmap(fused)(x.float().view(3, 2, 16)), vmap(reference)(x.view(3, 2, 16)), "vmap")


@pytest.mark.parametrize("activation,final", CURVED_FORMS)
def test_double_backward_of_curved_activations_matches_autograd(use_backend, activation, final):
    """Activations that are not piecewise linear have a second derivative: the recompute must carry it (the block
    keeps x for it)."""
    use_backend("torch")
    torch.manual_seed(3)
    fused = fr.FusedResidualBlock(8, 8, hidden_features=24, activation=activation, final_activation=final,
                                  device=DEVICE, dtype=torch.float64)
    x = torch.randn(5, 8, device=DEVICE, dtype=torch.float64, requires_grad=True)
    act = ACTIVATIONS[activation].forward

    def plain(inp, w1, b1, w2, b2):
        y = torch.nn.functional.linear(act(torch.nn.functional.linear(inp, w1, b1)), w2, b2) + inp
        return y if final is None else torch.relu(y)

    params = [p.detach().clone().requires_grad_(True) for p in fused.parameters()]
    xr = x.detach().clone().requires_grad_(True)
    for fn, inputs in ((fused, [x, *fused.parameters()]), (lambda i: plain(i, *params), [xr, *params])):
        inp = inputs[0]
        y = fn(inp)
        (g,) = torch.autograd.grad(y.pow(2).sum(), inp, create_graph=True)
        g.pow(2).sum().backward()
    assert_close(x.grad, xr.grad, "x grad")
    for p, q in zip(fused.parameters(), params, strict=True):
        assert_close(p.grad, q.grad, "param grad")


@pytest.mark.parametrize("choice", CHOICES)
def test_single_layer_op_double_backward(use_backend, choice):
    use_backend(choice)
    torch.manual_seed(4)
    shapes = ((6, 8), (10, 8), (10,), (6, 10))
    inputs = [torch.randn(*s, device=DEVICE, dtype=torch.float64) for s in shapes]
    fused_in = [t.float().requires_grad_(True) for t in inputs]
    ref_in = [t.clone().requires_grad_(True) for t in inputs]
    for fn, args in ((fr.functional.linear_residual_relu, fused_in),
                     (lambda h, w, b, r: torch.relu(h @ w.t() + b + r), ref_in)):
        y = fn(*args)
        grads = torch.autograd.grad(y.pow(2).sum(), args, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
    for name, a, b in zip("hwbr", fused_in, ref_in, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", scale=20)
