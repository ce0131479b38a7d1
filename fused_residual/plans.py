"""Plans: a call's fixed cost is paid once per signature, not once per call.

``run_block`` (the modules and ``functional.residual_block``) and ``run_linear_residual_relu`` first build a key
of everything that decides how a call is computed:

- the form, what needs a gradient (nothing under ``no_grad``), ``FUSED_RESIDUAL_BACKEND``;
- for ``x``: dtype, device, width, whether it is row-major (else its strides and inner dims), whether its data
  is 16-byte aligned, and its row count M as the power-of-two bucket the dispatch and the autotuners key on
  and the class Triton specializes an int on (1, a multiple of 16, other);
- for each weight and bias: dtype, device, shape, strides, 16-byte alignment; TF32 for float32.

A key seen before finds its plan, which runs the call with nothing else decided, checked or built: the backend's
recorded steps (``kernels/_plan.py``: allocations and launches of compiled kernels) or the composite. A new key
takes the layered path once: validation (``checks.py``), ``dispatch`` (route, kernel variants), the backend
recording its steps while it computes the call; the finished plan is stored only then, so two threads never
share a half-built one. Under autocast the key holds the dtype it runs ``x``'s linears in, and the plan casts the
weights as the layered path does. What is not in the key is checked where it would change a result:
``torch.func`` transforms and ``torch.compile`` tracing skip plans (the layered path handles them); the modules
check their hooks
before every call; the steps check Triton's launch hooks, knobs and current device; the row count's exact value
picks split-K slices and program counts (functions of M inside the steps). ``dispatch.reset()`` clears the plans.
``FUSED_RESIDUAL_PLANS=0`` (read at import, or ``ENABLED``) turns them off; at most ``MAX_PLANS`` are kept.

The autograd Functions run a plan in forward and keep it for backward, whose plans are keyed by the output
gradient's facts (dtype, strides, alignment) and whether the backward builds a graph. Inputs keep their leading
dims: they are flattened to 2-D inside the Function, so no view nodes join the autograd graph. Saved for backward,
through ``save_for_backward`` only (so saved-tensor hooks, checkpointing and ``save_on_cpu`` see all of it;
``saving.block_keeps`` / ``save_linear`` decide, and the custom ops of ``ops.py`` use them too): in the default
mode no more than eager keeps (the hidden activation or pre-activation, ``out`` for the final ReLU's mask, the
weights, ``x`` only for a weight gradient, no bias); a recompute block (the key's ``mode``) keeps ``x``, the weights,
``b1`` and its final ReLU's packed sign bits; nothing at all when no input needs a gradient. A backward that builds a
graph (``create_graph=True``), or that receives a gradient for the kept hidden layer (the Function's second output:
a second-order term), differentiates through the plain formulas of ``composite.block_grads`` instead of the
kernels, so double backward and gradient penalties are exact.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import checks, composite, dispatch, saving
from ._tensors import rows, with_leading_dims
from .activations import SEED_FORM, Form
from .backends import Backend

ENV_VAR = "FUSED_RESIDUAL_PLANS"
ENABLED: bool = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")
MAX_PLANS = 512

_plans: dict[tuple, object] = {}
_lock = threading.Lock()

_environ_get = os.environ.get
# FUSED_RESIDUAL_BACKEND is read at every call: from os.environ's own bytes mapping where it has one (a tenth of
# os.environ.get's cost; the same value, os.environ keeps it in step).
_environ_data = getattr(os.environ, "_data", None)
_backend_key = os.environ.encodekey(dispatch.ENV_VAR) if hasattr(os.environ, "encodekey") else None
_fast_environ = _backend_key is not None and type(_environ_data) is dict
_grad_enabled = torch.is_grad_enabled
_autocast_on = checks.any_autocast_enabled
_functorch_on = torch._C._are_functorch_transforms_active
_compiling = torch.compiler.is_compiling
_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)
_F32 = torch.float32


def clear() -> None:
    """Forget every plan (the next call of each signature takes the layered path again)."""
    _plans.clear()


dispatch.on_reset(clear)


def _store(key: tuple, plan: object) -> None:
    with _lock:
        if len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest
        _plans[key] = plan


def _backend_choice():
    """The raw value of ``FUSED_RESIDUAL_BACKEND`` (bytes or str), for keys."""
    return _environ_data.get(_backend_key) if _fast_environ else _environ_get(dispatch.ENV_VAR)


def _rows_facts(t: Tensor) -> tuple:
    """``(M, facts)`` of an operand whose row count varies: M and everything else a plan depends on."""
    s = t.shape
    n = s[-1]
    m = s[0] if len(s) == 2 else t.numel() // n
    # The row bucket (the dispatch's and autotuners' key) and the class Triton specializes an int on.
    return m, (t.dtype, t.device, n, True if t.is_contiguous() else (t.stride(), s[1:-1]), t.data_ptr() & 15,
               (m - 1).bit_length(), m == 1, m & 15 == 0, m >> 31)


def _facts(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() & 15)


def _planned(backend: Backend, name: str, tensors: tuple, *args, **kwargs) -> tuple:
    """``(backend.<name>(*tensors, *args, **kwargs), run)`` where ``run(*tensors)`` computes it again for new
    tensors of the same signature: the backend's own ``plan_<name>`` where it has one, else a call of ``<name>``."""
    planner = getattr(backend, f"plan_{name}", None)
    if planner is not None:
        return planner(*tensors, *args, **kwargs)
    fn = getattr(backend, name)

    def run(*tensors):
        return fn(*tensors, *args, **kwargs)

    result = run(*tensors)
    if name == "linear_residual_relu_forward":  # its plan returns a 1-tuple, as the recorded steps do
        result = (result,)
        return result, lambda *tensors: (fn(*tensors, *args, **kwargs),)
    return result, run


def needs_autograd(*tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# ---- the block ------------------------------------------------------------------------------------------------

def run_block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
              form: Form, mode: int = saving.DEFAULT) -> Tensor:
    """The block on a call's operands (``x`` of any leading dims): its plan, or the layered path that validates
    them and builds one. Under autocast the linears run in its dtype and the output has the reference's dtype.
    ``mode``: what a training call keeps for backward (``saving.py``: the default, or a recompute mode)."""
    key, m, low = None, 0, None
    if ENABLED and not (_functorch_on() or _compiling()):
        try:  # the key, written out: this runs on every call
            if _autocast_on():
                low = checks.autocast_dtype(x)  # the dtype autocast runs x's linears in, or None
            shape = x.shape
            n = shape[-1]
            m = shape[0] if len(shape) == 2 else x.numel() // n
            key = (form, x.dtype, x.device, n, True if x.is_contiguous() else (x.stride(), shape[1:-1]),
                   x.data_ptr() & 15, (m - 1).bit_length(), m == 1, m & 15 == 0, m >> 31,
                   w1.dtype, w1.device, w1.shape, w1.stride(), w1.data_ptr() & 15,
                   w2.dtype, w2.device, w2.shape, w2.stride(), w2.data_ptr() & 15,
                   b1 is not None and (b1.dtype, b1.device, b1.shape, b1.stride(), b1.data_ptr() & 15),
                   b2 is not None and (b2.dtype, b2.device, b2.shape, b2.stride(), b2.data_ptr() & 15),
                   ws is not None and (ws.dtype, ws.device, ws.shape, ws.stride(), ws.data_ptr() & 15),
                   _grad_enabled() and (x.requires_grad, w1.requires_grad, b1 is not None and b1.requires_grad,
                                        w2.requires_grad, b2 is not None and b2.requires_grad,
                                        ws is not None and ws.requires_grad),
                   _environ_data.get(_backend_key) if _fast_environ else _environ_get(dispatch.ENV_VAR),
                   x.dtype is _F32 and _tf32(), low, mode)
            plan = _plans[key]
        except Exception:  # a new signature (KeyError), or operands the key cannot describe: the layered path
            pass
        else:
            return plan(x, w1, b1, w2, b2, ws)  # type: ignore[operator]
        if not m:
            key = None
    given = (w1, b1, w2, b2, ws)
    w1, b1, w2, b2, ws, out_dtype = checks.block_operands(x, w1, b1, w2, b2, ws, form)
    training = needs_autograd(x, w1, b1, w2, b2, ws)
    if mode != saving.DEFAULT and _functorch_on():  # transforms take the plain composite: no saved-tensor hooks
        mode = saving.DEFAULT
    chosen = dispatch.route(x, w1, ws, form, training, mode != saving.DEFAULT)
    if chosen.op:  # torch.compile is tracing: the registered op (ops.py)
        keep = saving.block_keeps(form, (x.requires_grad, w1.requires_grad, b1 is not None and b1.requires_grad,
                                         w2.requires_grad, b2 is not None and b2.requires_grad,
                                         ws is not None and ws.requires_grad) if training else (False,) * 6, mode)
        out, _ = torch.ops.fused_residual.block_forward(rows(x), w1, b1, w2, b2, ws, *form, mode,
                                                        keep[saving.HIDDEN], keep[saving.SIGNS])
        out = with_leading_dims(out, x, w2.shape[0])
    else:
        grad_dtype = form.output_dtype(x.dtype, w1.dtype, ws is not None) if training else None
        plan = BlockPlan(chosen, dispatch.kernel_variants(chosen, x, w1, ws, form, grad_dtype), form, training,
                         mode)
        out = plan(x, w1, b1, w2, b2, ws)
        if key is not None and plan.forward is not None:
            cast = tuple(a is not b for a, b in zip((w1, b1, w2, b2, ws), given, strict=True))
            _store(key, plan if low is None else AutocastPlan(plan, low, cast, out_dtype))
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)


class AutocastPlan:
    """A block plan under autocast: the weights cast as ``checks.block_operands`` casts them (``cast``: which of
    w1, b1, w2, b2, ws it cast to ``low``), the output converted to the reference's dtype."""

    __slots__ = ("plan", "low", "cast", "out_dtype")

    def __init__(self, plan: BlockPlan, low: torch.dtype, cast: tuple[bool, ...], out_dtype: torch.dtype | None):
        self.plan, self.low, self.cast, self.out_dtype = plan, low, cast, out_dtype

    def __call__(self, x, *weights):
        low = self.low
        out = self.plan(x, *(t.to(low) if c else t for t, c in zip(weights, self.cast, strict=True)))
        return out if self.out_dtype is None or self.out_dtype == out.dtype else out.to(self.out_dtype)


class BlockPlan:
    """A block call at one signature: the composite, or a backend's forward (and, in training, its backward per
    output-gradient signature) as the backend recorded them (``Backend.plan_block_forward``)."""

    __slots__ = ("backend", "variants", "form", "training", "mode", "keep", "forward", "backwards")

    def __init__(self, chosen: dispatch.Route, variants: tuple, form: Form, training: bool,
                 mode: int = saving.DEFAULT):
        self.backend: Backend | None = chosen.backend
        # training: under the block's Function (the composite runs under PyTorch's own autograd instead)
        self.variants, self.form, self.training = variants, form, training and chosen.backend is not None
        self.mode = mode if training else saving.DEFAULT
        self.keep: tuple[bool, ...] | None = None  # what the Function keeps (the needs are the key's: fixed)
        self.forward = None if chosen.backend is not None else composite.block_of_weights
        self.backwards: dict[tuple, object] = {}

    def __call__(self, x, w1, b1, w2, b2, ws):
        if self.training:
            return _apply_block(x, w1, b1, w2, b2, ws, self)[0]
        run = self.forward
        if run is None or self.backend is None:
            return self.first_or_composite(x, w1, b1, w2, b2, ws)
        if x.dim() == 2:
            return run(x, w1, b1, w2, b2, ws)[0]
        return with_leading_dims(run(rows(x), w1, b1, w2, b2, ws)[0], x, w2.shape[0])

    def first_or_composite(self, x, w1, b1, w2, b2, ws):
        if self.backend is None:
            if self.mode != saving.DEFAULT:  # a forced composite: plain ops, recomputed by checkpointing
                return checkpoint(composite.block_of_weights, x, w1, b1, w2, b2, ws, self.form, use_reentrant=False)
            return composite.block_of_weights(x, w1, b1, w2, b2, ws, self.form)
        out = self.run_forward(x if x.dim() == 2 else rows(x), w1, b1, w2, b2, ws, False, False)[0]
        return out if x.dim() == 2 else with_leading_dims(out, x, w2.shape[0])

    def run_forward(self, x, w1, b1, w2, b2, ws, save, signs):
        run = self.forward
        if run is not None:
            return run(x, w1, b1, w2, b2, ws)
        kwargs = {"signs": True} if signs else {}
        result, self.forward = _planned(self.backend, "block_forward", (x, w1, b1, w2, b2, ws), self.form, save=save,
                                        variant=self.variants[0], **kwargs)
        return result

    def run_backward(self, dout, x, saved, out, w1, w2, ws, b1, bits, needs, x_dtype):
        try:
            key = (_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15)
            run = self.backwards[key]
        except KeyError:
            pass
        else:
            return run(dout, x, saved, out, w1, w2, ws, b1, bits)
        if dispatch.backward_builds_graph():
            return None  # the Function differentiates through the composite
        grads, run = _planned(self.backend, "block_backward", (dout, x, saved, out, w1, w2, ws, b1, bits),
                              self.form, needs, dx_dtype=x_dtype, variant=self.variants[1])
        if run is not None and dout.shape[0]:
            self.backwards[key] = run
        return grads


class ResidualBlockFunction(torch.autograd.Function):
    """``(out, hidden)``: the block's output and, in the default mode, its kept hidden layer as a second output
    (None where not kept), so that a double backward differentiates through it (``composite.block_grads``)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, ws, plan):  # type: ignore[override]
        keep = plan.keep
        if keep is None:
            keep = plan.keep = saving.block_keeps(plan.form, ctx.needs_input_grad, plan.mode)
        save_hidden, save_signs = keep[saving.HIDDEN], keep[saving.SIGNS]
        out, kept = plan.run_forward(x if x.dim() == 2 else rows(x), w1, b1, w2, b2, ws, save_hidden, save_signs)
        ctx.plan, ctx.x_meta = plan, (x.shape, x.dtype)
        ctx.set_materialize_grads(False)
        hidden = kept if save_hidden else None
        # saving.KEPT's order, written out (this runs on every training call); the weights are always kept.
        ctx.save_for_backward(x if keep[0] else None, hidden, out if keep[2] else None, kept if save_signs else None,
                              w1, b1 if keep[5] else None, w2, ws)
        return (out if x.dim() == 2 else with_leading_dims(out, x, w2.shape[0])), hidden

    @staticmethod
    def backward(ctx, dout, dhidden):  # type: ignore[override]
        if dout is None and dhidden is None:
            return (None,) * 7
        needs = ctx.needs_input_grad[:6]
        x_shape, x_dtype = ctx.x_meta
        saved = ctx.saved_tensors
        grads = None
        if dhidden is None:
            x, hidden, out, bits, w1, b1, w2, ws = saved
            nd = dout.dim() != 2
            grads = ctx.plan.run_backward(rows(dout) if nd else dout, rows(x) if nd and x is not None else x, hidden,
                                          out, w1, w2, ws, b1, bits, needs, x_dtype)
        if grads is None:  # a backward that builds a graph, or a gradient through the kept hidden layer
            grads = composite.block_grads(dout, dhidden, saved, ctx.plan.form, needs, x_dtype)
        dx = grads[0]
        if dx is not None and len(x_shape) != 2:
            dx = dx.view(x_shape)
        return (dx, *grads[1:], None)


def _c_apply(function: type[torch.autograd.Function]):
    """``function.apply`` without its Python part. The Functions run only where no ``torch.func`` transform is
    active (``dispatch.route`` sends those calls to the composite), and there ``Function.apply`` only unwraps
    functorch's dead wrappers before it calls the C entry: a few microseconds per training call."""
    try:
        return super(torch.autograd.Function, function).apply
    except AttributeError:  # another torch's layout of Function: its own apply
        return function.apply


_apply_block = _c_apply(ResidualBlockFunction)


# ---- the single fused layer -----------------------------------------------------------------------------------

def run_linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h W^T + b + residual)`` on a call's operands: its plan, or the layered path that validates them."""
    key, m = None, 0
    if ENABLED and not (_autocast_on() or _compiling() or _functorch_on()):
        try:
            m, h_facts = _rows_facts(h)
            r_facts = _rows_facts(residual)[1]
            needs = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad,
                     residual.requires_grad) if _grad_enabled() else None
            key = ("linear_residual_relu", needs, _backend_choice(), h_facts, r_facts, _facts(w),
                   _facts(b), h.dtype is _F32 and _tf32())
            plan = _plans[key]
        except Exception:
            pass
        else:
            return plan(h, w, b, residual)  # type: ignore[operator]
        if not m:
            key = None
    h, w, b = checks.linear_residual_relu_operands(h, w, b, residual)
    training = needs_autograd(h, w, b, residual)
    chosen = dispatch.route(h, w, None, SEED_FORM, training)
    if chosen.op:
        out = torch.ops.fused_residual.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        return with_leading_dims(out, h, w.shape[0])
    plan = LayerPlan(chosen.backend, training)
    out = plan(h, w, b, residual)
    if key is not None and plan.forward is not None:
        _store(key, plan)
    return out


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
        result, self.forward = _planned(self.backend, "linear_residual_relu_forward", (h, w, b, residual))
        return result[0]

    def run_backward(self, dout, h, out, w, needs, h_dtype):
        try:
            key = (_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15)
            run = self.backwards[key]
        except KeyError:
            pass
        else:
            return run(dout, h, out, w)
        if dispatch.backward_builds_graph():
            return None
        grads, run = _planned(self.backend, "linear_residual_relu_backward", (dout, h, out, w), needs,
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


_apply_layer = _c_apply(LinearResidualReluFunction)


def save_linear(ctx, h: Tensor, out: Tensor, w: Tensor) -> None:
    """Keep what the single layer's backward needs; ``h`` only if ``dW`` is asked for."""
    needs = ctx.needs_input_grad
    if any(needs[:4]):
        ctx.save_for_backward(h if needs[1] else None, out, w)


# ---- the net without autograd ---------------------------------------------------------------------------------

def run_net_inference(x: Tensor, w_in: Tensor, b_in: Tensor | None,
                      blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                      b_out: Tensor | None) -> Tensor:
    """``linear(blocks(relu(linear(x))))`` of seed-form blocks without autograd or autocast (callers check both),
    validated here. A forced backend runs it as one unit where it has one (the Triton whole-net kernel), else
    layer by layer; ``auto`` runs each block as a block call (the whole-net kernel has no measured win yet)."""
    checks.net_operands(x, w_in, b_in, blocks, w_out, b_out)
    choice = dispatch.requested()
    x2d = rows(x)
    if choice in (dispatch.AUTO, dispatch.COMPOSITE_CHOICE):
        a = torch.relu_(F.linear(x2d, w_in, b_in))
        for w1, b1, w2, b2 in blocks:
            a = run_block(a, w1, b1, w2, b2, None, SEED_FORM)
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
