"""The block as plain, differentiable PyTorch ops: where autograd (or ``torch.func``, or ``torch.compile``) must
see every op.

Used where the dispatch finds a Function not worth its cost, under ``torch.func`` transforms and while
``torch.export`` traces, for backward passes that build a graph (double backward), and by fused modules whose
submodules must run as themselves (hooks, ``nn.Linear`` subclasses with their own ``forward``). Same semantics as
the reference modules, including their dtypes under autocast: the reference form's output keeps the linears' dtype (the
reference adds the shortcut in place, ``out += x``), the FFN form's promotes.

The math is written out once (``block_of_modules``); every other plain-PyTorch form of the block derives from it.
The reference modules (``reference.py``) keep their own code, in-place ops and all: they are what users have. The
torch backend (``backends/torch_backend.py``) computes the same block differently, with the bias and residual
folded into the GEMM's accumulator (fewer passes over memory, inside an ``autograd.Function``), and says so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import signs
from .activations import Form

_relu_backward = torch.ops.aten.threshold_backward


def block_of_modules(x: Tensor, linear1: Callable[[Tensor], Tensor], linear2: Callable[[Tensor], Tensor],
                     shortcut: Callable[[Tensor], Tensor] | None, form: Form) -> Tensor:
    """``final(linear2(act(linear1(x))) + shortcut(x))`` with ``shortcut`` None for the identity: the block's math,
    written out once. Each linear is a module (the fused modules' path when their submodules must run as
    themselves, hooks and all) or a callable (``block_of_weights``)."""
    y = linear2(_hidden(linear1(x), form))
    s = x if shortcut is None else shortcut(x)
    out = s + y  # out of place: linear2's output may be a view autograd forbids modifying (a full backward hook)
    if form.final_activation is None:
        return out  # the FFN's `x + ffn(x)` promotes, as users write it
    # The reference's `out += identity` keeps linear2's dtype (under autocast, not x's).
    return torch.relu_(out if out.dtype == y.dtype else out.to(y.dtype))


def block_of_weights(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
                     form: Form) -> Tensor:
    """``block_of_modules`` with the weights given. The linears run in the weights' dtype (``x`` cast to it, as
    autocast would), so it gives the autocast result outside an autocast region too (a recompute in backward)."""
    low = w1.dtype
    return block_of_modules(x, lambda t: F.linear(t if t.dtype == low else t.to(low), w1, b1),
                            lambda h: F.linear(h, w2, b2),
                            None if ws is None else lambda t: F.linear(t if t.dtype == low else t.to(low), ws), form)


def _hidden(pre: Tensor, form: Form) -> Tensor:
    act = form.hidden
    return act.forward_(pre) if act.from_output else act.forward(pre)  # in place only where backward reads the output


def linear_add_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(F.linear(h, w, b) + residual)`` (the single fused layer), out of place (a wider residual promotes)."""
    return torch.relu(F.linear(h if h.dtype == w.dtype else h.to(w.dtype), w, b) + residual)


def block_grads(dout: Tensor | None, dhidden: Tensor | None, saved: tuple[Tensor | None, ...], form: Form,
                needs: tuple[bool, ...], x_dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """The block's input gradients ``(dx, dw1, db1, dw2, db2, dws)`` (``dx`` 2-D) as differentiable ops of what the
    block kept (``saved = (x, hidden, out, signs, w1, b1, w2, ws)``, ``saving.block_keeps``), for a backward that
    builds a graph (double backward, gradient penalties) or that receives a gradient for the kept hidden layer.

    Where the block keeps no ``x`` (``saving.returns_hidden``), its Function returns the kept hidden layer as a
    second output (its pre-activation for a smooth activation, else its output), so autograd differentiates through
    it back into the Function: a second-order term through the hidden layer comes back as ``dhidden``, and becomes
    ``dpre = act'(saved) dhidden``, ``dx += dpre W1``, ``dW1 += dpre^T x``, ``db1 += sum dpre``: neither the biases
    nor (for a smooth activation) ``x`` need be kept for it. Where ``x`` is kept (and in a recompute block), the
    hidden layer is computed again here from ``x``, ``w1`` and ``b1`` (``hidden`` passed as None), the inputs
    themselves, so autograd sees it whole. The final ReLU enters only through its mask (from ``out`` or its
    packed sign bits), whose derivative is 0.
    """
    x, hidden, out, bits, w1, b1, w2, ws = saved
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    grads: list[Tensor | None] = [None] * 6
    low = w1.dtype if w1 is not None else w2.dtype
    x2d = None if x is None else x.reshape(-1, x.shape[-1])
    x_low = None if x2d is None else (x2d if x2d.dtype == low else x2d.to(low))
    act = form.hidden
    if hidden is None and x is not None:  # a recompute block
        with torch.enable_grad():
            hidden = F.linear(x_low, w1, b1)
            hidden = act.forward(hidden) if act.from_output else hidden
    g1 = None
    if dout is not None:
        g2 = dout.reshape(-1, dout.shape[-1])
        if form.final_activation is not None:
            g2 = _relu_backward(g2, out, 0) if out is not None else g2.masked_fill(~signs.unpack(bits, g2.shape[1]), 0)
        g2_low = g2 if g2.dtype == low else g2.to(low)
        if need_w2:
            grads[3] = g2_low.t().mm(hidden if act.from_output else act.forward(hidden))
        if need_b2:
            grads[4] = g2_low.sum(0)
        if need_ws:
            grads[5] = g2_low.t().mm(x_low)
        if need_x or need_w1 or need_b1:
            g1 = _activation_grad(act, g2_low.mm(w2), hidden)
        if need_x:
            grads[0] = g2 if ws is None else g2_low.mm(ws)
    if dhidden is not None:  # through the kept hidden layer (a second-order term)
        dpre = dhidden.reshape(-1, dhidden.shape[-1])
        dpre = _activation_grad(act, dpre, hidden) if act.from_output else dpre
        g1 = dpre if g1 is None else g1 + dpre
    if g1 is not None:
        if need_w1:
            grads[1] = g1.t().mm(x_low)
        if need_b1:
            grads[2] = g1.sum(0)
        if need_x:
            dx = g1.mm(w1).to(x_dtype)
            grads[0] = dx if grads[0] is None else dx + grads[0].to(x_dtype)
    if grads[0] is not None:
        grads[0] = grads[0].to(x_dtype)
    return tuple(grads)


def _activation_grad(act, grad: Tensor, saved: Tensor) -> Tensor:
    """``grad * act'(pre)`` from what the activation keeps, differentiable to second order: the registry's backward
    for a piecewise-linear activation (its mask's derivative is 0), else autograd through ``act.forward`` (not every
    aten activation backward has a derivative of its own: ``silu_backward`` has none)."""
    if act.piecewise_linear:
        return act.backward(grad, saved)
    with torch.enable_grad():
        pre = saved if saved.requires_grad else saved.detach().requires_grad_(True)
        return torch.autograd.grad(act.forward(pre), pre, grad, create_graph=True)[0]


def linear_grads(dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, ...],
                 h_dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """``(dh, dw, db, dresidual)`` of ``linear_residual_relu`` as differentiable ops (the ReLU mask's derivative
    is 0, so these formulas hold to second order)."""
    g = _relu_backward(dout, out, 0)
    g_low = g if g.dtype == w.dtype else g.to(w.dtype)
    return (g_low.mm(w).to(h_dtype) if needs[0] else None, g_low.t().mm(h) if needs[1] else None,
            g_low.sum(0) if needs[2] else None, g if needs[3] else None)
