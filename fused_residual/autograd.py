"""The autograd Functions: one for the whole residual block, one for the single fused layer.

Each asks ``backends.select`` once, in forward, and keeps that backend for backward. Inputs keep their leading
dims: they are flattened to 2-D here, inside the Function, so no view nodes join the autograd graph. Saved for
backward, through ``save_for_backward`` (so saved-tensor hooks, checkpointing and ``save_on_cpu`` see them):
``x`` (only when a weight gradient needs it), ``h`` and ``out`` (the ReLU masks are ``h > 0`` and ``out > 0``)
and the weights; nothing at all when no input needs a gradient.

``save_block`` / ``save_linear`` decide what is kept; the ops registered for ``torch.compile`` (``ops.py``) use
them too, so eager and compiled runs keep the same tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends


def rows(t: Tensor) -> Tensor:
    """``t`` as 2-D ``(rows, features)`` (a view where the strides allow it)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def with_leading_dims(t: Tensor, like: Tensor, features: int) -> Tensor:
    """``t (M, features)`` viewed with the leading dims of ``like``."""
    return t if like.dim() == 2 else t.view(*like.shape[:-1], features)


def block_forward(x, w1, b1, w2, b2, ws) -> Tensor:
    """Forward of the whole block without autograd (``h`` may then stay on chip): ``out``, x's leading dims."""
    out, _ = backends.select(x).block_forward(rows(x), w1, b1, w2, b2, ws, need_h=False)
    return with_leading_dims(out, x, w2.shape[0])


def net_forward(x, w_in, b_in, blocks, w_out, b_out) -> Tensor:
    """Forward of the whole net without autograd: ``linear(blocks(relu(linear(x))))``, x's leading dims.

    ``blocks`` is a sequence of ``(w1, b1, w2, b2)``. Where the backend has a whole-net kernel that takes these
    widths, it is one launch; otherwise layer after layer with the backend's fused layers.
    """
    backend = backends.select(x)
    x2d = rows(x)
    hidden = w_in.shape[0]
    if getattr(backend, "whole_net_fits", lambda *a: False)(x2d, hidden, w_out.shape[0], b_in, blocks, b_out):
        y = backend.whole_net_forward(x2d, w_in, b_in, blocks, w_out, b_out)
    else:
        a = backend.linear_relu(x2d, w_in, b_in)
        for w1, b1, w2, b2 in blocks:
            a, _ = backend.block_forward(a, w1, b1, w2, b2, None, need_h=False)
        y = backend.linear(a, w_out, b_out)
    return with_leading_dims(y, x, w_out.shape[0])


def linear_residual_relu_forward(h, w, b, residual) -> Tensor:
    out = backends.select(h).linear_residual_relu_forward(rows(h), w, b, rows(residual))
    return with_leading_dims(out, h, w.shape[0])


def save_block(ctx, x2d: Tensor, h: Tensor, out: Tensor, w1: Tensor, w2: Tensor, ws: Tensor | None) -> None:
    """Keep what the block's backward needs; ``x`` only if ``dW1`` or ``dWs`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs):
        ctx.save_for_backward(x2d if needs[1] or needs[5] else None, h, out, w1, w2, ws)


def save_linear(ctx, h2d: Tensor, out: Tensor, w: Tensor) -> None:
    """Keep what the single layer's backward needs; ``h`` only if ``dW`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs):
        ctx.save_for_backward(h2d if needs[1] else None, out, w)


class ResidualBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws):  # type: ignore[override]
        backend = backends.select(x)
        x2d = rows(x)
        out, h = backend.block_forward(x2d, w1, b1, w2, b2, ws)
        ctx.backend, ctx.x_shape = backend, x.shape
        save_block(ctx, x2d, h, out, w1, w2, ws)
        return with_leading_dims(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        grads = ctx.backend.block_backward(rows(dout), *ctx.saved_tensors, ctx.needs_input_grad)
        dx = grads[0]
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return (dx, *grads[1:])


class LinearResidualReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, residual):  # type: ignore[override]
        backend = backends.select(h)
        h2d = rows(h)
        out = backend.linear_residual_relu_forward(h2d, w, b, rows(residual))
        ctx.backend, ctx.h_shape, ctx.residual_shape = backend, h.shape, residual.shape
        save_linear(ctx, h2d, out, w)
        return with_leading_dims(out, h, w.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        dh, dw, db, dres = ctx.backend.linear_residual_relu_backward(
            rows(dout), *ctx.saved_tensors, ctx.needs_input_grad)
        if dh is not None:
            dh = dh.view(ctx.h_shape)
        if dres is not None:
            dres = dres.view(ctx.residual_shape)
        return dh, dw, db, dres


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must go through autograd (else the backend is called directly: less overhead)."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)
