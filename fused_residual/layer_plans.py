"""Plans for the single fused layer, ``relu(h W^T + b + residual)`` (``functional.linear_residual_relu``): as
``plans.py``'s for the block, keyed by each operand's facts, the backend choice, TF32 and autocast's dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, composite, dispatch, plans
from ._functions import c_apply, direct_backward
from ._tensors import rows, rows_facts, tensor_facts, with_leading_dims
from .activations import REFERENCE_FORM
from .backends import Backend
from .plans import _autocast_on, _backend_choice, _compiling, _functorch_on, _grad_enabled, _tf32, needs_autograd

_F32 = torch.float32


def run_linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h W^T + b + residual)`` on a call's operands: its plan, or the layered path that validates them.
    Under autocast the key holds its dtype, and the plan casts as the layered path does."""
    key, m, low = None, 0, None
    if plans.ENABLED and not (_compiling() or _functorch_on()):
        try:
            if _autocast_on():
                low = checks.autocast_dtype(h)
            m, h_facts = rows_facts(h)
            r_facts = rows_facts(residual)[1]
            needs = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad,
                     residual.requires_grad) if _grad_enabled() else None
            key = ("linear_residual_relu", needs, _backend_choice(), h_facts, r_facts, tensor_facts(w),
                   tensor_facts(b), h.dtype is _F32 and _tf32(), low)
            plan = plans._plans[key]
        except Exception:
            pass
        else:
            return plan(h, w, b, residual)  # type: ignore[operator]
        if not m:
            key = None
    given = (h, w, b)
    h, w, b = checks.linear_residual_relu_operands(h, w, b, residual)
    training = needs_autograd(h, w, b, residual)
    chosen = dispatch.route(h, w, None, REFERENCE_FORM, training)
    if chosen.op:
        out = torch.ops.fused_residual.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        return with_leading_dims(out, h, w.shape[0])
    plan = LayerPlan(chosen.backend, training)
    try:
        out = plan(h, w, b, residual)
    except Exception as error:  # the kernels failed on an unverified family: the torch backend, or raise
        plan = LayerPlan(dispatch.fall_back(chosen, dispatch.signature(h, w, None, REFERENCE_FORM), error).backend,
                         training)
        out = plan(h, w, b, residual)
    if key is not None and plan.forward is not None:
        cast = tuple(a is not c for a, c in zip((h, w, b), given, strict=True))
        plans.store(key, plan if low is None else AutocastLayerPlan(plan, low, cast, w.dtype))
    return out


class AutocastLayerPlan:
    """A single-layer plan under autocast: ``w`` and ``b`` cast to ``low`` and ``h`` to the weights' dtype where
    ``checks.linear_residual_relu_operands`` casts them (``cast``: h, w, b)."""

    __slots__ = ("plan", "low", "cast", "h_dtype")

    def __init__(self, plan: LayerPlan, low: torch.dtype, cast: tuple[bool, ...], h_dtype: torch.dtype):
        self.plan, self.low, self.cast, self.h_dtype = plan, low, cast, h_dtype

    def __call__(self, h, w, b, residual):
        cast_h, cast_w, cast_b = self.cast
        return self.plan(h.to(self.h_dtype) if cast_h else h, w.to(self.low) if cast_w else w,
                         b.to(self.low) if cast_b else b, residual)


class LayerPlan:
    """A single-layer call at one signature (as ``BlockPlan`` for the block)."""

    __slots__ = ("backend", "training", "forward", "backwards")

    def __init__(self, backend: Backend | None, training: bool):
        self.backend, self.training = backend, training
        self.forward = None if backend is not None else composite.linear_add_relu
        self.backwards: dict[tuple, object] = {}

    def __call__(self, h, w, b, residual):
        if self.backend is None:
            return composite.linear_add_relu(h, w, b, residual)
        if self.training:
            return _apply_layer(h, w, b, residual, self)
        out = self.run_forward(rows(h), w, b, rows(residual))
        return with_leading_dims(out, h, w.shape[0])

    def run_forward(self, h, w, b, residual):
        run = self.forward
        if run is not None:
            return run(h, w, b, residual)[0]
        result, self.forward = plans.planned(self.backend, "linear_residual_relu_forward", (h, w, b, residual))
        return result[0]

    def run_backward(self, dout, h, out, w, needs, h_dtype):
        run, key = plans.recorded_backward(self.backwards, dout)
        if run is not None:
            return run(dout, h, out, w)
        if dispatch.backward_builds_graph():
            return None
        grads, run = plans.planned(self.backend, "linear_residual_relu_backward", (dout, h, out, w), needs,
                              dh_dtype=h_dtype)
        if run is not None and dout.shape[0]:
            self.backwards[key] = run
        return grads


class LinearResidualReluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, residual, plan):  # type: ignore[override]
        out = plan.run_forward(rows(h), w, b, rows(residual))
        ctx.plan, ctx.h_meta, ctx.residual_shape = plan, (h.shape, h.dtype), residual.shape
        save_linear(ctx, h, out, w)
        return with_leading_dims(out, h, w.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        h_shape, h_dtype = ctx.h_meta
        needs = ctx.needs_input_grad[:4]
        h, out, w = ctx.saved_tensors
        h2d = None if h is None else rows(h)
        grads = ctx.plan.run_backward(rows(dout), h2d, out, w, needs, h_dtype)
        if grads is None:
            grads = composite.linear_grads(rows(dout), h2d, out, w, needs, h_dtype)
        dh, dw, db, dres = grads
        if dh is not None:
            dh = dh.view(h_shape)
        if dres is not None:
            dres = dres.view(ctx.residual_shape)
        return dh, dw, db, dres, None


_apply_layer = c_apply(LinearResidualReluFunction)
direct_backward(LinearResidualReluFunction)


def save_linear(ctx, h: Tensor, out: Tensor, w: Tensor) -> None:
    """Keep what the single layer's backward needs; ``h`` only if ``dW`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs[:4]):
        ctx.save_for_backward(h if needs[1] else None, out, w)
