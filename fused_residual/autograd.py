"""The autograd Functions: one for the whole residual block, one for the single fused layer.

Each runs the ``routing.Route`` it is given (a backend and a kernel variant) in forward and keeps it for backward.
Inputs keep their leading dims: they are flattened to 2-D here, inside the Function, so no view nodes join the
autograd graph. Saved for backward, through ``save_for_backward`` (so saved-tensor hooks, checkpointing and
``save_on_cpu`` see them; ``save_block`` / ``save_linear`` decide, and the custom ops of ``ops.py`` use them
too): what the backend's backward reads (the hidden activation or pre-activation, ``out`` for the final ReLU's
mask, the weights), ``x`` only where a weight gradient or a smooth activation's second derivative needs it, and
nothing at all when no input needs a gradient.

A backward that builds a graph (``create_graph=True``) differentiates through the plain composite instead of the
kernels (``composite.block_grads``), so double backward and gradient penalties are exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import composite
from ._tensors import rows, with_leading_dims
from .activations import Form


def save_block(ctx, form: Form, x: Tensor, hidden: Tensor, out: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
               b2: Tensor | None, ws: Tensor | None) -> None:
    """Keep what the block's backward needs (``needs_input_grad`` in the order x, w1, b1, w2, b2, ws)."""
    needs = ctx.needs_input_grad
    if any(needs[:6]):
        keep_x = any(needs[1:6]) or not form.hidden.piecewise_linear
        keep_out = form.final_activation is not None
        # The biases only serve the recompute of a double backward, which needs x too.
        ctx.save_for_backward(x if keep_x else None, hidden, out if keep_out else None, w1, b1 if keep_x else None,
                              w2, b2 if keep_x else None, ws)


def save_linear(ctx, h: Tensor, out: Tensor, w: Tensor) -> None:
    """Keep what the single layer's backward needs; ``h`` only if ``dW`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs[:4]):
        ctx.save_for_backward(h if needs[1] else None, out, w)


class ResidualBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws, form, route):  # type: ignore[override]
        out, hidden = route.backend.block_forward(rows(x), w1, b1, w2, b2, ws, form, save=True,
                                                  variant=route.variant)
        ctx.route, ctx.form, ctx.x_dtype = route, form, x.dtype
        save_block(ctx, form, x, hidden, out, w1, b1, w2, b2, ws)
        return with_leading_dims(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        needs = ctx.needs_input_grad[:6]
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return (*composite.block_grads(dout, saved, ctx.form, needs, ctx.x_dtype), None, None)
        x, hidden, out, w1, _, w2, _, ws = saved
        grads = ctx.route.backend.block_backward(
            rows(dout), None if x is None else rows(x), hidden, out, w1, w2, ws, ctx.form, needs,
            dx_dtype=ctx.x_dtype, variant=ctx.route.variant)
        dx = grads[0]
        if dx is not None and dout.dim() != 2:
            dx = dx.view(*dout.shape[:-1], dx.shape[-1])
        return (dx, *grads[1:], None, None)


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
