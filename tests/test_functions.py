"""The autograd Functions' fast entries (``fused_residual/_functions.py``) and the block Function's outputs."""

from __future__ import annotations

import pytest
import torch

import fused_residual as fr
from fused_residual import _functions, layer_plans, plans, saving
from fused_residual.activations import REFERENCE_FORM


def test_the_engine_calls_the_package_backwards_directly_on_this_torch():
    assert _functions.node_apply_hash() in _functions._KNOWN_NODE_APPLY
    for function in (plans.ResidualBlockFunction, layer_plans.LinearResidualReluFunction):
        assert function._backward_cls.apply is function.backward


def test_a_function_with_its_own_vjp_or_boxed_gradients_keeps_torchs_apply():
    class WithVjp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def vjp(ctx, g):
            return g * 2

    class Boxed(torch.autograd.Function):
        boxed_grads_call = True

        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grads):
            return grads[0] * 2

    for function in (WithVjp, Boxed):
        assert not _functions.direct_backward(function)
        assert function._backward_cls.apply is torch.autograd.function.BackwardCFunction.apply
        x = torch.randn(3, requires_grad=True)
        function.apply(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_an_unknown_node_apply_is_left_alone(monkeypatch):
    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 3

        @staticmethod
        def backward(ctx, g):
            return g * 3

    monkeypatch.setattr(_functions, "_KNOWN_NODE_APPLY", set())
    assert not _functions.direct_backward(Plain)
    assert Plain._backward_cls.apply is torch.autograd.function.BackwardCFunction.apply


def test_setting_to_save_saves_what_save_for_backward_saves_on_this_torch():
    """The block Function sets ``ctx.to_save`` where ``PLAIN_SAVE``: on this torch that keeps the same tensors, by
    identity, through the same saved-tensor hooks, with the same version checks."""
    assert _functions.PLAIN_SAVE

    class Saves(torch.autograd.Function):
        direct = False

        @staticmethod
        def forward(ctx, x, w):
            out = x * w
            if Saves.direct:
                ctx.to_save = (x, None, out, w)
            else:
                ctx.save_for_backward(x, None, out, w)
            return out

        @staticmethod
        def backward(ctx, g):
            x, none, out, w = ctx.saved_tensors
            assert none is None
            return g * w, (g * x).sum()

    seen = {}
    for direct in (False, True):
        Saves.direct = direct
        x, w = torch.randn(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
        packed: list = []

        def pack(t, packed=packed):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = Saves.apply(x, w)
        seen[direct] = [t is x or t is w or t is out for t in packed], len(packed)
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
        y = Saves.apply(x.clone(), w)
        with torch.no_grad():
            y.add_(1)  # modified after it was saved: backward must refuse
        try:
            y.sum().backward()
        except RuntimeError as error:
            seen[direct] += ("modified by an inplace operation" in str(error),)
    assert seen[False] == seen[True] == ([True, True, True], 3, True)


def test_an_unknown_save_for_backward_is_called_as_it_is(monkeypatch):
    monkeypatch.setattr(_functions, "_KNOWN_SAVE", set())
    assert not _functions.plain_save()


def test_the_hidden_layer_is_a_second_output_only_where_x_is_not_kept():
    # x, w1, b1, w2, b2, ws: the weights trained keep x (the double backward recomputes the hidden layer from it,
    # with b1); only x trained keeps no x, and the hidden layer is returned for the double backward.
    trained = saving.block_keeps(REFERENCE_FORM, (True, True, True, True, True, False))
    assert trained[saving.X] and trained[saving.HIDDEN] and trained[saving.KEPT.index("b1")]
    assert not saving.returns_hidden(trained)
    frozen = saving.block_keeps(REFERENCE_FORM, (True, False, False, False, False, False))
    assert not frozen[saving.X] and frozen[saving.HIDDEN] and not frozen[saving.KEPT.index("b1")]
    assert saving.returns_hidden(frozen)
    assert not saving.returns_hidden(saving.block_keeps(REFERENCE_FORM, (True,) * 5 + (False,), saving.RECOMPUTE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_cached_training_call_runs_its_plans_own_function_and_matches_the_layered_path(use_backend, monkeypatch,
                                                                                         backend):
    """A training step whose plan keeps x, the hidden layer and the output runs, once cached, a Function of the
    plan's own (the plan bound in the class): its gradients equal the layered path's, bit for bit, for a 2-D x, a
    3-D x of the same plan (the generic forward), a second backward through a retained graph, and a double
    backward (the plain formulas)."""
    use_backend(backend)
    monkeypatch.setattr(plans, "ENABLED", True)
    plans.clear()
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(24, 24)
    x = torch.randn(20, 24)

    def step(inp, create_graph=False, retain=False):
        inp = inp.detach().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        out = block(inp)
        grads = torch.autograd.grad(out, (inp, *block.parameters()), out.detach() * 0.5 + 0.25,
                                    create_graph=create_graph, retain_graph=retain or create_graph)
        if retain:
            again = torch.autograd.grad(out, (inp, *block.parameters()), out.detach() * 0.5 + 0.25)
            assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))
        if create_graph:  # a gradient penalty's second backward, through the first
            second = torch.autograd.grad(sum(g.square().sum() for g in grads), (inp, *block.parameters()))
            return [out.detach(), *(g.detach() for g in grads), *second], out.grad_fn
        return [out.detach(), *grads], out.grad_fn

    def layered(*args, **kwargs):
        monkeypatch.setattr(plans, "ENABLED", False)
        try:
            return step(*args, **kwargs)[0]
        finally:
            monkeypatch.setattr(plans, "ENABLED", True)

    step(x)  # builds the plan
    for inp, kwargs in ((x, {}), (x.view(4, 5, 24), {}), (x, {"retain": True}), (x, {"create_graph": True})):
        results, node = step(inp, **kwargs)
        assert type(node).__name__ == "PlannedBlockFunctionBackward", type(node).__name__
        expected = layered(inp, **kwargs)
        assert len(results) == len(expected)
        for a, e in zip(results, expected, strict=True):
            assert a.shape == e.shape and torch.equal(a, e)
    plans.clear()
