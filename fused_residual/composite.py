"""The block as plain, differentiable PyTorch ops: where autograd (or ``torch.func``, or ``torch.compile``) must
see every op.

Used where the dispatch finds a Function not worth its cost, under ``torch.func`` transforms and while
``torch.export`` traces, for backward passes that build a graph (double backward), and by fused modules whose
submodules must run as themselves (hooks, ``nn.Linear`` subclasses with their own ``forward``). Same semantics as
the reference modules, including their dtypes under autocast: the seed form's output keeps the linears' dtype (the
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


def block_grads(dout: Tensor, saved: tuple[Tensor | None, ...], form: Form, needs: tuple[bool, ...],
                x_dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """The block's input gradients as differentiable ops of the saved tensors, for a backward that builds a graph
    (``create_graph=True``): double backward, gradient penalties.

    ``saved`` is ``(x, saved_hidden, out, w1, b1, w2, b2, ws)`` as ``autograd.save_block`` keeps it. Where ``x``
    was kept, the forward is recomputed from the inputs and differentiated by autograd, so every second-order
    term is there. Otherwise (ReLU, only ``dx`` asked: the masks are all that depends on ``x`` and their
    derivative is 0) the gradient is written out from the saved masks.
    """
    x, hidden, out, w1, b1, w2, b2, ws = saved
    if x is not None:
        inputs = (x, w1, b1, w2, b2, ws)
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        with torch.enable_grad():
            y = block_of_weights(x, w1, b1, w2, b2, ws, form)
            grads = iter(torch.autograd.grad(y, wanted, dout, create_graph=True))
        return tuple(next(grads) if need else None for need in needs)
    dout2d = dout.reshape(-1, dout.shape[-1])
    g2 = dout2d if form.final_activation is None else _relu_backward(dout2d, out, 0)
    low = w1.dtype
    g2_low = g2 if g2.dtype == low else g2.to(low)
    g1 = _relu_backward(g2_low.mm(w2), hidden, 0)
    shortcut = g2 if ws is None else g2_low.mm(ws)
    dx = g1.mm(w1).to(x_dtype) + shortcut.to(x_dtype)
    return (dx.view(*dout.shape[:-1], dx.shape[-1]), *(None,) * (len(needs) - 1))


def linear_grads(dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, ...],
                 h_dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """``(dh, dw, db, dresidual)`` of ``linear_residual_relu`` as differentiable ops (the ReLU mask's derivative
    is 0, so these formulas hold to second order)."""
    g = _relu_backward(dout, out, 0)
    g_low = g if g.dtype == w.dtype else g.to(w.dtype)
    return (g_low.mm(w).to(h_dtype) if needs[0] else None, g_low.t().mm(h) if needs[1] else None,
            g_low.sum(0) if needs[2] else None, g if needs[3] else None)
