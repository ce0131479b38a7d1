"""The block's calls on their operands, and the autograd Functions that run a backend under autograd.

``run_block`` (the modules and ``functional.residual_block``), ``run_linear_residual_relu`` and
``run_net_inference`` validate their operands (``checks.py``), ask ``dispatch`` which way to go and go there: the
registered ops (``torch.compile`` tracing, called through ``torch.ops``), the plain composite, or a backend, under
the block's ``autograd.Function`` when a gradient is needed and called directly when not.

The Functions run the backend and kernel variants they are given in forward and keep them for backward. Inputs
keep their leading dims: they are flattened to 2-D here, inside the Function, so no view nodes join the autograd
graph. Saved for backward, through ``save_for_backward`` (so saved-tensor hooks, checkpointing and
``save_on_cpu`` see them; ``save_block`` / ``save_linear`` decide, and the custom ops of ``ops.py`` use them
too): what the backend's backward reads (the hidden activation or pre-activation, ``out`` for the final ReLU's
mask, the weights), ``x`` only where a weight gradient or a smooth activation's second derivative needs it, and
nothing at all when no input needs a gradient. A backward that builds a graph (``create_graph=True``)
differentiates through the plain composite instead of the kernels (``composite.block_grads``), so double backward
and gradient penalties are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, composite, dispatch
from ._tensors import rows, with_leading_dims
from .activations import SEED_FORM, Form
from .backends import Backend


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
    def forward(ctx, x, w1, b1, w2, b2, ws, form, backend, variants):  # type: ignore[override]
        out, hidden = backend.block_forward(rows(x), w1, b1, w2, b2, ws, form, save=True, variant=variants[0])
        ctx.backend, ctx.variant, ctx.form, ctx.x_dtype = backend, variants[1], form, x.dtype
        save_block(ctx, form, x, hidden, out, w1, b1, w2, b2, ws)
        return with_leading_dims(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        needs = ctx.needs_input_grad[:6]
        saved = ctx.saved_tensors
        if dispatch.backward_builds_graph():
            return (*composite.block_grads(dout, saved, ctx.form, needs, ctx.x_dtype), None, None, None)
        x, hidden, out, w1, _, w2, _, ws = saved
        grads = ctx.backend.block_backward(
            rows(dout), None if x is None else rows(x), hidden, out, w1, w2, ws, ctx.form, needs,
            dx_dtype=ctx.x_dtype, variant=ctx.variant)
        dx = grads[0]
        if dx is not None and dout.dim() != 2:
            dx = dx.view(*dout.shape[:-1], dx.shape[-1])
        return (dx, *grads[1:], None, None, None)


class LinearResidualReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, residual, backend):  # type: ignore[override]
        out = backend.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        ctx.backend, ctx.h_meta, ctx.residual_shape = backend, (h.shape, h.dtype), residual.shape
        save_linear(ctx, h, out, w)
        return with_leading_dims(out, h, w.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        h_shape, h_dtype = ctx.h_meta
        needs = ctx.needs_input_grad[:4]
        h, out, w = ctx.saved_tensors
        if dispatch.backward_builds_graph():
            dh, dw, db, dres = composite.linear_grads(rows(dout), None if h is None else rows(h), out, w, needs,
                                                      h_dtype)
        else:
            dh, dw, db, dres = ctx.backend.linear_residual_relu_backward(
                rows(dout), None if h is None else rows(h), out, w, needs, dh_dtype=h_dtype)
        if dh is not None:
            dh = dh.view(h_shape)
        if dres is not None:
            dres = dres.view(ctx.residual_shape)
        return dh, dw, db, dres, None


# ---- calls ------------------------------------------------------------------------------------------------

def needs_autograd(*tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def run_block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
              form: Form) -> Tensor:
    """The block on a call's operands (``x`` of any leading dims), validated here; under autocast the linears run
    in its dtype and the output has the reference's dtype."""
    w1, b1, w2, b2, ws, out_dtype = checks.block_operands(x, w1, b1, w2, b2, ws, form)
    out = _block(x, w1, b1, w2, b2, ws, form)
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)


def _block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
           form: Form) -> Tensor:
    """The block on validated operands (under autocast the weights already cast)."""
    training = needs_autograd(x, w1, b1, w2, b2, ws)
    chosen = dispatch.route(x, w1, ws, form, training)
    if chosen.op:
        out, _ = torch.ops.fused_residual.block_forward(rows(x), w1, b1, w2, b2, ws, *form)
        return with_leading_dims(out, x, w2.shape[0])
    if chosen.backend is None:
        return composite.block_of_weights(x, w1, b1, w2, b2, ws, form)
    grad_dtype = form.output_dtype(x.dtype, w1.dtype, ws is not None) if training else None
    variants = dispatch.kernel_variants(chosen, x, w1, ws, form, grad_dtype)
    if training:
        return ResidualBlockFunction.apply(x, w1, b1, w2, b2, ws, form, chosen.backend, variants)
    out, _ = chosen.backend.block_forward(rows(x), w1, b1, w2, b2, ws, form, save=False, variant=variants[0])
    return with_leading_dims(out, x, w2.shape[0])


def run_linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h W^T + b + residual)`` on a call's operands, validated here."""
    h, w, b = checks.linear_residual_relu_operands(h, w, b, residual)
    chosen = dispatch.route(h, w, None, SEED_FORM, needs_autograd(h, w, b, residual))
    if chosen.op:
        out = torch.ops.fused_residual.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        return with_leading_dims(out, h, w.shape[0])
    if chosen.backend is None:
        return composite.linear_add_relu(h, w, b, residual)
    if needs_autograd(h, w, b, residual):
        return LinearResidualReluFunction.apply(h, w, b, residual, chosen.backend)
    out = chosen.backend.linear_residual_relu_forward(rows(h), w, b, rows(residual))
    return with_leading_dims(out, h, w.shape[0])


def run_net_inference(x: Tensor, w_in: Tensor, b_in: Tensor | None,
                      blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                      b_out: Tensor | None) -> Tensor:
    """``linear(blocks(relu(linear(x))))`` of seed-form blocks without autograd or autocast (callers check both),
    validated here. A forced backend runs it as one unit where it has one (the Triton whole-net kernel), else
    layer by layer; ``auto`` routes each block like a block call (the whole-net kernel has no measured win yet)."""
    checks.net_operands(x, w_in, b_in, blocks, w_out, b_out)
    choice = dispatch.requested()
    x2d = rows(x)
    if choice in (dispatch.AUTO, dispatch.COMPOSITE_CHOICE):
        a = torch.relu_(F.linear(x2d, w_in, b_in))
        for w1, b1, w2, b2 in blocks:
            a = _block(a, w1, b1, w2, b2, None, SEED_FORM)
        y = F.linear(a, w_out, b_out)
    else:
        chosen = dispatch.forced(choice, x.device, x.dtype, SEED_FORM)
        backend: Backend = chosen.backend  # type: ignore[assignment]
        y = None if chosen.variant else backend.net_forward(x2d, w_in, b_in, blocks, w_out, b_out)
        if y is None:
            a = backend.linear(x2d, w_in, b_in, "relu")
            if blocks:
                variant = dispatch.kernel_variants(chosen, a, blocks[0][0], None, SEED_FORM, None)[0]
            for w1, b1, w2, b2 in blocks:
                a, _ = backend.block_forward(a, w1, b1, w2, b2, None, SEED_FORM, save=False, variant=variant)
            y = backend.linear(a, w_out, b_out)
    return with_leading_dims(y, x, w_out.shape[0])
