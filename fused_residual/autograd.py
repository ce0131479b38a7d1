"""The autograd Functions: one for the whole residual block, one for the single fused layer.

Each runs the ``routing.Route`` it is given (a backend and a kernel variant) in forward and keeps it for backward.
Inputs keep their leading dims: they are flattened to 2-D here, inside the Function, so no view nodes join the
autograd graph. Saved for backward, through ``save_for_backward`` only (so saved-tensor hooks, checkpointing and
``save_on_cpu`` see all of it; ``saving.block_keeps`` / ``save_linear`` decide, and the custom ops of ``ops.py``
use them too): in the default mode what the backend's backward reads (the hidden activation or pre-activation,
``out`` for the final ReLU's mask, the weights, ``x`` only for a weight gradient), with ``recompute`` the input,
``w1``, ``b1`` and the final ReLU's packed sign bits; nothing at all when no input needs a gradient.

A backward that builds a graph (``create_graph=True``), or that receives a gradient for the kept hidden layer (a
second-order term), differentiates through the plain formulas of ``composite.block_grads`` instead of the kernels,
so double backward and gradient penalties are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import composite
from ._tensors import rows, with_leading_dims
from .saving import block_keeps


def save_linear(ctx, h: Tensor, out: Tensor, w: Tensor) -> None:
    """Keep what the single layer's backward needs; ``h`` only if ``dW`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs[:4]):
        ctx.save_for_backward(h if needs[1] else None, out, w)


class ResidualBlockFunction(torch.autograd.Function):
    """``(out, hidden)``: the block's output and, in the default mode, its kept hidden layer as a second output
    (None when not kept), so that a double backward differentiates through it (``composite.block_grads``)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws, form, route, recompute, out_kept):  # type: ignore[override]
        keep = block_keeps(form, ctx.needs_input_grad, recompute, out_kept)
        out, kept = route.backend.block_forward(rows(x), w1, b1, w2, b2, ws, form, save=keep[1], signs=keep[3],
                                                variant=route.variant)
        hidden = kept if keep[1] else None
        bits = kept if keep[3] else None
        ctx.route, ctx.form, ctx.x_meta = route, form, (x.shape, x.dtype)
        ctx.set_materialize_grads(False)
        tensors = (x, hidden, out, bits, w1, b1, w2, ws)
        ctx.save_for_backward(*(t if k else None for t, k in zip(tensors, keep, strict=True)))
        return with_leading_dims(out, x, w2.shape[0]), hidden

    @staticmethod
    def backward(ctx, dout, dhidden):  # type: ignore[override]
        needs = ctx.needs_input_grad[:6]
        x_shape, x_dtype = ctx.x_meta
        saved = ctx.saved_tensors
        if dout is None and dhidden is None:
            return (None,) * 10
        if dhidden is not None or dout is None or torch.is_grad_enabled():  # create_graph=True, or a second order
            grads = composite.block_grads(dout, dhidden, saved, ctx.form, needs, x_dtype)
        else:
            x, hidden, out, bits, w1, b1, w2, ws = saved
            grads = ctx.route.backend.block_backward(
                rows(dout), None if x is None else rows(x), hidden, out, w1, w2, ws, ctx.form, needs,
                dx_dtype=x_dtype, variant=ctx.route.variant, b1=b1, signs=bits)
        dx = grads[0]
        if dx is not None and len(x_shape) != 2:
            dx = dx.view(x_shape)
        return (dx, *grads[1:], None, None, None, None)


class LinearResidualReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, residual, route):  # type: ignore[override]
        out = route.backend.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        ctx.route, ctx.h_meta, ctx.residual_shape = route, (h.shape, h.dtype), residual.shape
        save_linear(ctx, h, out, w)
        return with_leading_dims(out, h, w.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        h_shape, h_dtype = ctx.h_meta
        needs = ctx.needs_input_grad[:4]
        h, out, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dh, dw, db, dres = composite.linear_grads(rows(dout), None if h is None else rows(h), out, w, needs,
                                                      h_dtype)
        else:
            dh, dw, db, dres = ctx.route.backend.linear_residual_relu_backward(
                rows(dout), None if h is None else rows(h), out, w, needs, dh_dtype=h_dtype)
        if dh is not None:
            dh = dh.view(h_shape)
        if dres is not None:
            dres = dres.view(ctx.residual_shape)
        return dh, dw, db, dres, None
