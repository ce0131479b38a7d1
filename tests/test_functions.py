"""The autograd Functions' fast entries (``fused_residual/_functions.py``) and the block Function's outputs."""

from __future__ import annotations

import torch

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
