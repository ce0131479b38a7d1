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
through ``save_for_backward`` (so saved-tensor hooks, checkpointing and ``save_on_cpu`` see them; ``save_block`` /
``save_linear`` decide, and the custom ops of ``ops.py`` use them too): what the backend's backward reads (the
hidden activation or pre-activation, ``out`` for the final ReLU's mask, the weights), ``x`` only where a weight
gradient or a smooth activation's second derivative needs it, and nothing at all when no input needs a gradient.
A backward that builds a graph (``create_graph=True``) differentiates through the plain composite instead of the
kernels (``composite.block_grads``), so double backward and gradient penalties are exact.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, composite, dispatch
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


def store(key: tuple, plan: object) -> None:
    with _lock:
        if len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest
        _plans[key] = plan


def _backend_choice():
    """The raw value of ``FUSED_RESIDUAL_BACKEND`` (bytes or str), for keys."""
    return _environ_data.get(_backend_key) if _fast_environ else _environ_get(dispatch.ENV_VAR)


def rows_facts(t: Tensor) -> tuple:
    """``(M, facts)`` of an operand whose row count varies: M and everything else a plan depends on."""
    s = t.shape
    n = s[-1]
    m = s[0] if len(s) == 2 else t.numel() // n
    # The row bucket (the dispatch's and autotuners' key) and the class Triton specializes an int on.
    return m, (t.dtype, t.device, n, True if t.is_contiguous() else (t.stride(), s[1:-1]), t.data_ptr() & 15,
               (m - 1).bit_length(), m == 1, m & 15 == 0, m >> 31)


def tensor_facts(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() & 15)


def planned(backend: Backend, name: str, tensors: tuple, *args, **kwargs) -> tuple:
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
        return (result,), Run(lambda *tensors: (fn(*tensors, *args, **kwargs),))
    return result, Run(run)


class Run:
    """A plan's computation that is a plain call: ``function`` (as a recorded ``Steps``' generated function, which
    callers take where it is not None)."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *tensors):
        return self.function(*tensors)


def needs_autograd(*tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# ---- the block ------------------------------------------------------------------------------------------------

def run_block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
              form: Form) -> Tensor:
    """The block on a call's operands (``x`` of any leading dims): its plan, or the layered path that validates
    them and builds one. Under autocast the linears run in its dtype and the output has the reference's dtype."""
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
                   x.dtype is _F32 and _tf32(), low)
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
    chosen = dispatch.route(x, w1, ws, form, training)
    if chosen.op:  # torch.compile is tracing: the registered op (ops.py)
        out, _ = torch.ops.fused_residual.block_forward(rows(x), w1, b1, w2, b2, ws, *form)
        out = with_leading_dims(out, x, w2.shape[0])
    else:
        grad_dtype = form.output_dtype(x.dtype, w1.dtype, ws is not None) if training else None
        needs = tuple(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, ws)) if training else None
        plan = BlockPlan(chosen, dispatch.kernel_variants(chosen, x, w1, ws, form, grad_dtype), form, needs,
                         x.dtype, dispatch.signature(x, w1, ws, form) if chosen.may_fall_back else ())
        try:
            out = plan(x, w1, b1, w2, b2, ws)
        except Exception as error:  # the kernels failed on an unverified family: the torch backend, or raise
            chosen = dispatch.fall_back(chosen, dispatch.signature(x, w1, ws, form), error)
            plan = BlockPlan(chosen, (None, None), form, needs, x.dtype)
            out = plan(x, w1, b1, w2, b2, ws)
        if key is not None and plan.forward is not None:
            cast = tuple(a is not b for a, b in zip((w1, b1, w2, b2, ws), given, strict=True))
            store(key, plan.entry() if low is None else AutocastPlan(plan, low, cast, out_dtype))
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
    output-gradient signature) as the backend recorded them (``Backend.plan_block_forward``). In training, what
    needs a gradient (``needs``: x, w1, b1, w2, b2, ws; part of the key) and so what the backward keeps
    (``keep``) are the plan's."""

    __slots__ = ("backend", "variants", "form", "training", "forward", "backwards", "needs", "keep", "x_dtype",
                 "chosen", "signature")

    def __init__(self, chosen: dispatch.Route, variants: tuple, form: Form, needs: tuple[bool, ...] | None,
                 x_dtype: torch.dtype, signature: tuple = ()):
        self.chosen, self.signature = chosen, signature  # for dispatch.fall_back
        self.backend: Backend | None = chosen.backend
        # training: under the block's Function (the composite runs under PyTorch's own autograd instead)
        self.variants, self.form, self.training = variants, form, needs is not None and chosen.backend is not None
        self.forward = None if chosen.backend is not None else composite.block_of_weights
        self.backwards: dict[tuple, object] = {}
        self.needs, self.x_dtype = needs, x_dtype
        self.keep = block_keeps(form, needs) if needs is not None else None

    def entry(self):
        """What a cached call calls: in training the Function's C apply with this plan bound (no Python frame of
        its own), else the plan."""
        return functools.partial(_apply_block, self) if self.training else self

    def __call__(self, x, w1, b1, w2, b2, ws):
        if self.training:
            return _apply_block(self, x, w1, b1, w2, b2, ws)
        run = self.forward
        if run is None or self.backend is None:
            return self.first_or_composite(x, w1, b1, w2, b2, ws)
        if x.dim() == 2:
            return run(x, w1, b1, w2, b2, ws)[0]
        return with_leading_dims(run(rows(x), w1, b1, w2, b2, ws)[0], x, w2.shape[0])

    def first_or_composite(self, x, w1, b1, w2, b2, ws):
        if self.backend is None:
            return composite.block_of_weights(x, w1, b1, w2, b2, ws, self.form)
        out = self.run_forward(x if x.dim() == 2 else rows(x), w1, b1, w2, b2, ws, False)[0]
        return out if x.dim() == 2 else with_leading_dims(out, x, w2.shape[0])

    def run_forward(self, x, w1, b1, w2, b2, ws, save):
        run = self.forward
        if run is not None:
            return run(x, w1, b1, w2, b2, ws)
        result, self.forward = planned(self.backend, "block_forward", (x, w1, b1, w2, b2, ws), self.form, save=save,
                                        variant=self.variants[0])
        return result

    def run_backward(self, dout, x, saved, out, w1, w2, ws, needs, x_dtype):
        try:
            key = (_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15)
            run = self.backwards[key]
        except KeyError:
            pass
        else:
            return run(dout, x, saved, out, w1, w2, ws)
        if dispatch.backward_builds_graph():
            return None  # the Function differentiates through the composite
        try:
            grads, run = planned(self.backend, "block_backward", (dout, x, saved, out, w1, w2, ws), self.form, needs,
                                  dx_dtype=x_dtype, variant=self.variants[1])
        except Exception as error:  # the kernels failed on an unverified family: the composite, or raise
            dispatch.fall_back(self.chosen, self.signature, error)
            return None
        if run is not None and dout.shape[0]:
            self.backwards[key] = run
        return grads


class ResidualBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, x, w1, b1, w2, b2, ws):  # type: ignore[override]
        run = plan.forward
        flat = x.dim() == 2
        if run is not None and flat:  # the cached call, written out
            out, hidden = (run.function or run)(x, w1, b1, w2, b2, ws)
        else:
            out, hidden = plan.run_forward(x if flat else rows(x), w1, b1, w2, b2, ws, True)
        ctx.plan = plan
        keep = plan.keep  # block_keeps' order
        ctx.save_for_backward(x if keep[0] else None, hidden, out if keep[2] else None, w1, b1 if keep[4] else None,
                              w2, b2 if keep[6] else None, ws)
        return out if flat else with_leading_dims(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        plan = ctx.plan
        saved = ctx.saved_tensors
        x, hidden, out, w1, _, w2, _, ws = saved
        if dout.dim() == 2:  # the cached call, written out
            run = plan.backwards.get((_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15))
            if run is not None:
                return (None, *(run.function or run)(dout, x, hidden, out, w1, w2, ws))
        nd = dout.dim() != 2
        grads = plan.run_backward(rows(dout) if nd else dout, rows(x) if nd and x is not None else x, hidden,
                                  out, w1, w2, ws, plan.needs, plan.x_dtype)
        if grads is None:
            return (None, *composite.block_grads(dout, saved, plan.form, plan.needs, plan.x_dtype))
        dx = grads[0]
        if dx is not None and nd:
            dx = dx.view(*dout.shape[:-1], dx.shape[-1])
        return (None, dx, *grads[1:])


def _c_apply(function: type[torch.autograd.Function]):
    """``function.apply`` without its Python part. The Functions run only where no ``torch.func`` transform is
    active (``dispatch.route`` sends those calls to the composite), and there ``Function.apply`` only unwraps
    functorch's dead wrappers before it calls the C entry: a few microseconds per training call."""
    try:
        return super(torch.autograd.Function, function).apply
    except AttributeError:  # another torch's layout of Function: its own apply
        return function.apply


_apply_block = _c_apply(ResidualBlockFunction)


def block_keeps(form: Form, needs: tuple[bool, ...]) -> tuple[bool, ...]:
    """Which of ``(x, hidden, out, w1, b1, w2, b2, ws)`` the block's backward keeps, given ``needs`` (what needs a
    gradient: x, w1, b1, w2, b2, ws): nothing if nothing does."""
    if not any(needs[:6]):
        return (False,) * 8
    keep_x = any(needs[1:6]) or not form.hidden.piecewise_linear
    keep_out = form.final_activation is not None
    # The biases only serve the recompute of a double backward, which needs x too.
    return keep_x, True, keep_out, True, keep_x, True, keep_x, True


def save_block(ctx, form: Form, x: Tensor, hidden: Tensor, out: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
               b2: Tensor | None, ws: Tensor | None) -> None:
    """Keep what the block's backward needs (``needs_input_grad`` in the order x, w1, b1, w2, b2, ws)."""
    keep = block_keeps(form, ctx.needs_input_grad)
    if keep[1]:
        ctx.save_for_backward(*(t if k else None for t, k in zip((x, hidden, out, w1, b1, w2, b2, ws), keep,
                                                                 strict=True)))


# ---- the single fused layer -----------------------------------------------------------------------------------

def run_linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h W^T + b + residual)`` on a call's operands: its plan, or the layered path that validates them.
    Under autocast the key holds its dtype, and the plan casts as the layered path does."""
    key, m, low = None, 0, None
    if ENABLED and not (_compiling() or _functorch_on()):
        try:
            if _autocast_on():
                low = checks.autocast_dtype(h)
            m, h_facts = rows_facts(h)
            r_facts = rows_facts(residual)[1]
            needs = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad,
                     residual.requires_grad) if _grad_enabled() else None
            key = ("linear_residual_relu", needs, _backend_choice(), h_facts, r_facts, tensor_facts(w),
                   tensor_facts(b), h.dtype is _F32 and _tf32(), low)
            plan = _plans[key]
        except Exception:
            pass
        else:
            return plan(h, w, b, residual)  # type: ignore[operator]
        if not m:
            key = None
    given = (h, w, b)
    h, w, b = checks.linear_residual_relu_operands(h, w, b, residual)
    training = needs_autograd(h, w, b, residual)
    chosen = dispatch.route(h, w, None, SEED_FORM, training)
    if chosen.op:
        out = torch.ops.fused_residual.linear_residual_relu_forward(rows(h), w, b, rows(residual))
        return with_leading_dims(out, h, w.shape[0])
    plan = LayerPlan(chosen.backend, training)
    try:
        out = plan(h, w, b, residual)
    except Exception as error:  # the kernels failed on an unverified family: the torch backend, or raise
        plan = LayerPlan(dispatch.fall_back(chosen, dispatch.signature(h, w, None, SEED_FORM), error).backend,
                         training)
        out = plan(h, w, b, residual)
    if key is not None and plan.forward is not None:
        cast = tuple(a is not c for a, c in zip((h, w, b), given, strict=True))
        store(key, plan if low is None else AutocastLayerPlan(plan, low, cast, w.dtype))
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
        result, self.forward = planned(self.backend, "linear_residual_relu_forward", (h, w, b, residual))
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
        grads, run = planned(self.backend, "linear_residual_relu_backward", (dout, h, out, w), needs,
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
        if dispatch.net_as_one(chosen, x2d, w_in, b_in, blocks, w_out, b_out):
            y = backend.net_forward(x2d, w_in, b_in, blocks, w_out, b_out)
        else:
            a = backend.linear(x2d, w_in, b_in, "relu")
            if blocks:
                variant = dispatch.kernel_variants(chosen, a, blocks[0][0], None, SEED_FORM, None)[0]
            for w1, b1, w2, b2 in blocks:
                a, _ = backend.block_forward(a, w1, b1, w2, b2, None, SEED_FORM, save=False, variant=variant)
            y = backend.linear(a, w_out, b_out)
    return with_leading_dims(y, x, w_out.shape[0])
