"""The autograd Functions: one for the whole residual block, one for the single fused layer.

Each asks ``backends.select`` once, in forward, and keeps that backend for backward. Inputs keep their leading
dims: they are flattened to 2-D here, inside the Function, so no view nodes join the autograd graph. Saved for
backward: ``x`` (only when a weight gradient needs it), ``h`` and ``out`` (the ReLU masks are ``h > 0`` and
``out > 0``) and the weights; nothing at all when no input needs a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _lead(t: Tensor, like: Tensor, features: int) -> Tensor:
    """``t (M, features)`` viewed with the leading dims of ``like``."""
    return t if like.dim() == 2 else t.view(*like.shape[:-1], features)


def block_forward(x, w1, b1, w2, b2, ws) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the whole block without autograd: ``(out with x's leading dims, out 2-D, h 2-D)``."""
    out, h = backends.select(x.device).block_forward(_rows(x), w1, b1, w2, b2, ws)
    return _lead(out, x, w2.shape[0]), out, h


def linear_residual_relu_forward(h, w, b, residual) -> Tensor:
    out = backends.select(h.device).linear_residual_relu_forward(_rows(h), w, b, _rows(residual))
    return _lead(out, h, w.shape[0])


class ResidualBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws):  # type: ignore[override]
        backend = backends.select(x.device)
        x2d = _rows(x)
        out, h = backend.block_forward(x2d, w1, b1, w2, b2, ws)
        ctx.backend = backend
        if any(ctx.needs_input_grad):
            need_x_saved = ctx.needs_input_grad[1] or ctx.needs_input_grad[5]
            ctx.save_for_backward(x2d if need_x_saved else None, h, out, w1, w2, ws)
            ctx.x_shape = x.shape
        return _lead(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x2d, h, out, w1, w2, ws = ctx.saved_tensors
        grads = ctx.backend.block_backward(_rows(dout), x2d, h, out, w1, w2, ws, ctx.needs_input_grad)
        dx = grads[0]
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return (dx, *grads[1:])


class LinearResidualReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, residual):  # type: ignore[override]
        backend = backends.select(h.device)
        h2d = _rows(h)
        out = backend.linear_residual_relu_forward(h2d, w, b, _rows(residual))
        ctx.backend = backend
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(h2d if ctx.needs_input_grad[1] else None, out, w)
            ctx.h_shape, ctx.residual_shape = h.shape, residual.shape
        return _lead(out, h, w.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        h2d, out, w = ctx.saved_tensors
        dh, dw, db, dres = ctx.backend.linear_residual_relu_backward(_rows(dout), h2d, out, w, ctx.needs_input_grad)
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
