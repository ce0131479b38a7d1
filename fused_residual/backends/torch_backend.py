"""The ``torch`` backend: the block's forward and backward as a few plain PyTorch ops (cuBLAS / MKL GEMMs).

It is the reference implementation of the contract in ``backends/__init__.py`` and runs wherever PyTorch runs.
It computes the plain composite's math (``composite.py``) differently, which is why it is written apart: inside
the block's ``autograd.Function`` (it writes its own backward), and for few passes over memory: the bias and the
residual are folded into the GEMM's accumulator (``addmm_`` in place on ``x + b``), ReLUs run in place, and ReLU
masks are applied by ``threshold_backward`` (one pass, no boolean temporaries). Under autocast (``x`` wider than
the weights) the shortcut is added the way the reference block adds it: in place into the linears' dtype (reference
form) or out of place (FFN form).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import signs as signs_
from ..activations import ACTIVATIONS, Form
from ..kernels._common import is_gpu

NAME = "torch"
VARIANTS: tuple[str, ...] = ()

_relu_backward = torch.ops.aten.threshold_backward


def unavailable(device: torch.device, dtype: torch.dtype, form: Form) -> str | None:
    return None


def takes(variant: str, x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, grad_dtype: torch.dtype | None) -> bool:
    return True  # no kernel variants: one way for every call


def _mask_inplace(grad: Tensor, activation: Tensor) -> Tensor:
    """``grad * (activation > 0)`` written into ``grad`` (the exact rule autograd uses for ReLU)."""
    return _relu_backward.grad_input(grad, activation, 0, grad_input=grad)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def linear(x: Tensor, w: Tensor, b: Tensor | None, activation: str | None = None) -> Tensor:
    """``act(x @ w.T + b)``."""
    if activation == "relu" and b is not None and is_gpu(x.device):
        return torch._addmm_activation(b, x, w.t())  # bias and ReLU in cuBLASLt's epilogue: one launch
    y = x.mm(w.t()) if b is None else torch.addmm(b, x, w.t())
    return y if activation is None else ACTIVATIONS[activation].forward_(y)


def _accumulate(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``residual + b + h @ w.T`` as a new row-major tensor: the residual (plus bias) is the GEMM's accumulator."""
    acc = residual.clone(memory_format=torch.contiguous_format) if b is None else torch.add(residual, b)
    if not acc.is_contiguous():  # e.g. a transposed residual: the result must be row-major like F.linear's
        acc = acc.contiguous()
    return acc.addmm_(h, w.t())


def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)``; a wider residual (autocast) is added un-rounded, out of place."""
    if residual.dtype != h.dtype:
        return torch.add(residual, linear(h, w, b)).relu_()
    return _accumulate(h, w, b, residual).relu_()


def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, bool, bool, bool], *,
    dh_dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dh, dw, db, dresidual)`` of ``linear_residual_relu``, each only if ``needs`` asks."""
    g = _relu_backward(dout, out, 0)
    g_lo = _as(g, w.dtype)
    dh = _as(g_lo.mm(w), dh_dtype) if needs[0] else None
    dw = g_lo.t().mm(h) if needs[1] else None
    db = g_lo.sum(0) if needs[2] else None
    return dh, dw, db, (g if needs[3] else None)


def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None, form: Form,
    *, save: bool, variant: str | None = None, signs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``out = final(act(x W1^T + b1) W2^T + b2 + shortcut)``; see ``Backend.block_forward``. With ``signs``
    (a recompute block's final ReLU) the second result is ``out``'s packed sign bits instead of the hidden layer."""
    if signs:
        out, _ = block_forward(x, w1, b1, w2, b2, ws, form, save=False)
        return out, signs_.pack(out)
    act = form.hidden
    x_lo = _as(x, w1.dtype)
    pre = linear(x_lo, w1, b1, "relu" if act.name == "relu" else None)
    if act.from_output:  # ReLU: h is kept (done in place above)
        h = saved = pre
    else:
        saved = pre if save else None
        h = act.forward(pre) if save else act.forward_(pre)
    relu = form.final_activation == "relu"
    if ws is not None:
        out = linear(x_lo, ws, b2).addmm_(h, w2.t())
        return (out.relu_() if relu else out), saved
    if x.dtype == w1.dtype:
        out = _accumulate(h, w2, b2, x)
    elif relu:  # the reference's `out += identity`: the un-rounded x, added in place into the linears' dtype
        out = linear(h, w2, b2).add_(x)
    else:  # the FFN's `x + ffn(x)`: promotes to x's dtype
        out = torch.add(x, linear(h, w2, b2))
    return (out.relu_() if relu else out), saved


def block_backward(
    dout: Tensor, x: Tensor | None, saved: Tensor | None, out: Tensor | None, w1: Tensor, w2: Tensor,
    ws: Tensor | None, b1: Tensor | None, signs: Tensor | None, form: Form, needs: tuple[bool, ...], *,
    dx_dtype: torch.dtype, variant: str | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dw1, db1, dw2, db2, dws)``, each only if ``needs`` (same order) asks.

    ``g2 = dout * final'``, ``g1 = (g2 W2) * act'``, ``dx = g1 W1 + (g2 or g2 Ws)``, ``dW2 = g2^T h``,
    ``dW1 = g1^T x``, ``dWs = g2^T x``, ``db = row sums``. ``saved`` None: a recompute block, whose hidden layer
    is computed again from ``x``, ``w1`` and ``b1`` (one GEMM), and whose final ReLU reads ``signs`` (packed
    bits) where ``out`` is None.
    """
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    act = form.hidden
    lo = w1.dtype
    x_lo = None if x is None else _as(x, lo)
    if saved is None:  # what the forward would have kept: act(pre) where the derivative reads it, else pre
        saved = linear(x_lo, w1, b1, act.name if act.from_output else None)
    if form.final_activation is None:
        g2 = dout
    elif out is None:
        g2 = signs_.relu_backward(dout, signs)
    else:
        g2 = _relu_backward(dout, out, 0)
    g2_lo = _as(g2, lo)
    dw2 = g2_lo.t().mm(saved if act.from_output else act.forward(saved)) if need_w2 else None
    db2 = g2_lo.sum(0) if need_b2 else None
    dws = g2_lo.t().mm(x_lo) if need_ws else None
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        g1 = _mask_inplace(g2_lo.mm(w2), saved) if act.name == "relu" else act.backward(g2_lo.mm(w2), saved)
        dw1 = g1.t().mm(x_lo) if need_w1 else None
        db1 = g1.sum(0) if need_b1 else None
        if need_x:
            if ws is not None:
                dx = _as(g1.mm(w1).addmm_(g2_lo, ws), dx_dtype)
            elif dx_dtype == lo and g2 is not dout:
                dx = g2.addmm_(g1, w1)  # g2 is ours: the identity shortcut's gradient becomes dx's accumulator
            elif dx_dtype == lo:
                dx = torch.addmm(g2, g1, w1)
            else:  # autocast: as the reference, each path's gradient in x's dtype, then their sum
                dx = _as(g1.mm(w1), dx_dtype).add_(g2)
    return dx, dw1, db1, dw2, db2, dws


def takes_net(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor, b_out: Tensor | None,
) -> bool:
    """No single-unit net computation here: the caller runs the net layer by layer."""
    return False


def net_forward(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor, b_out: Tensor | None,
) -> Tensor:
    raise NotImplementedError("the torch backend has no single-unit net (takes_net is False)")

