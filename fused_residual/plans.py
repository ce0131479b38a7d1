"""Plans: a call's fixed cost is paid once per signature, not once per call.

``run_block`` (the modules and ``functional.residual_block``; ``layer_plans.py`` does the same for the single
layer) first builds a key of everything that decides how a call is computed: the form, what needs a gradient
(nothing under ``no_grad``), ``FUSED_RESIDUAL_BACKEND``, the saving mode; for ``x`` its dtype, device, width,
layout (row-major, else strides and inner dims), 16-byte alignment and its row count M as the power-of-two bucket
the dispatch and the autotuners key on and the class Triton specializes an int on (1, a multiple of 16, other); for
each weight and bias its dtype, device, shape, strides and alignment; TF32 for float32; autocast's dtype.

The newest block plan also holds a guard (``_tensors.signature_guard``: PyTorch's C++ check of the operands'
dtypes, devices, requires_grad, sizes and strides, any row count), so that a repeated signature is served with
the key's other facts and that check alone, without building the key (whose reads in Python cost a few times
the check).
A key seen before finds its plan, which runs the call with nothing else decided, checked or built: the backend's
recorded steps (``kernels/_plan.py``) or the composite. A new key takes the layered path once (``checks.py``,
``dispatch``, the backend recording its steps while it computes the call); the plan is stored only when finished,
so two threads never share a half-built one. What is not in the key is checked where it would change a result:
``torch.func`` transforms and ``torch.compile`` tracing skip plans; the modules check their hooks before every call;
the steps check Triton's launch hooks, knobs and current device; the exact row count picks split-K slices and
program counts inside the steps. ``dispatch.reset()`` clears the plans; ``FUSED_RESIDUAL_PLANS=0`` (read at import,
or ``ENABLED``) turns them off; at most ``MAX_PLANS`` are kept.

The autograd Functions run a plan in forward and keep it for backward, whose plans are keyed by the output
gradient's facts and whether the backward builds a graph. Inputs keep their leading dims (flattened inside the
Function: no view nodes join the graph). What is kept goes through ``save_for_backward`` only, so saved-tensor
hooks, checkpointing and ``save_on_cpu`` see all of it; ``saving.block_keeps`` / ``save_linear`` decide (the ops
of ``ops.py`` use them too). A backward that builds a graph, or that receives a gradient for the kept hidden layer
(the block Function's second output), differentiates through ``composite.block_grads``' plain formulas instead of
the kernels, so double backward and gradient penalties are exact.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import checks, composite, dispatch, saving
from ._functions import PLAIN_SAVE, c_apply, direct_backward
from ._tensors import rows, signature_guard, with_leading_dims
from .activations import REFERENCE_FORM, Form
from .backends import Backend

ENV_VAR = "FUSED_RESIDUAL_PLANS"
ENABLED: bool = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")
MAX_PLANS = 512

_plans: dict[tuple, object] = {}
_last: tuple | None = None  # run_block's newest plan with a guard
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
    global _last
    _plans.clear()
    _last = None


dispatch.on_reset(clear)


def store(key: tuple, plan: object) -> None:
    with _lock:
        if len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest
        _plans[key] = plan


def _backend_choice():
    """The raw value of ``FUSED_RESIDUAL_BACKEND`` (bytes or str), for keys."""
    return _environ_data.get(_backend_key) if _fast_environ else _environ_get(dispatch.ENV_VAR)


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


def recorded_backward(backwards: dict, dout: Tensor) -> tuple:
    """``(run, key)``: the backward recorded for an output gradient like ``dout`` (None where there is none) and
    its key: grad mode (a backward that builds a graph), ``dout``'s dtype, strides and 16-byte alignment. (The
    Functions' cached calls write the same key out.)"""
    key = (_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15)
    return backwards.get(key), key


def needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- the block ------------------------------------------------------------------------------------------------

def run_block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
              form: Form, mode: int = saving.DEFAULT) -> Tensor:
    """The block on a call's operands (``x`` of any leading dims): its plan, or the layered path that validates
    them and builds one. Under autocast the linears run in its dtype and the output has the reference's dtype.
    ``mode``: what a training call keeps for backward (``saving.py``: the default, or a recompute mode)."""
    global _last
    key, m, low = None, 0, None
    if ENABLED and not (_functorch_on() or _compiling()):
        try:  # the key, written out: this runs on every call
            if _autocast_on():
                low = checks.autocast_dtype(x)  # the dtype autocast runs x's linears in, or None
            shape = x.shape
            n = shape[-1]
            m = shape[0] if len(shape) == 2 else x.numel() // n
            # The facts a TensorGuards check leaves out: pointers' alignment (-1 for no tensor), the row count's
            # classes, the modes and settings.
            facts = (form, mode, low, _grad_enabled(),
                     _environ_data.get(_backend_key) if _fast_environ else _environ_get(dispatch.ENV_VAR),
                     x.dtype is _F32 and _tf32(), (m - 1).bit_length(), m == 1, m & 15 == 0, m >> 31,
                     x.data_ptr() & 15, w1.data_ptr() & 15, w2.data_ptr() & 15,
                     -1 if b1 is None else b1.data_ptr() & 15, -1 if b2 is None else b2.data_ptr() & 15,
                     -1 if ws is None else ws.data_ptr() & 15)
            last = _last  # the newest plan with a guard (b1 and b2 given)
            if last is not None and last.facts == facts and (last.guard.check(x, w1, b1, w2, b2) if ws is None
                                                             else last.guard.check(x, w1, b1, w2, b2, ws)):
                found = last
            else:
                key = (facts, x.dtype, x.device, n, True if x.is_contiguous() else (x.stride(), shape[1:-1]),
                       w1.dtype, w1.device, w1.shape, w1.stride(), w2.dtype, w2.device, w2.shape, w2.stride(),
                       b1 is not None and (b1.dtype, b1.device, b1.shape, b1.stride()),
                       b2 is not None and (b2.dtype, b2.device, b2.shape, b2.stride()),
                       ws is not None and (ws.dtype, ws.device, ws.shape, ws.stride()),
                       facts[3] and (x.requires_grad, w1.requires_grad, b1 is not None and b1.requires_grad,
                                     w2.requires_grad, b2 is not None and b2.requires_grad,
                                     ws is not None and ws.requires_grad))
                found = _plans[key]
                if found.guard is not None:
                    _last = found
        except Exception:  # a new signature (KeyError), or operands the key cannot describe: the layered path
            pass
        else:  # (outside the try: what the call raises is the caller's)
            return found.run(x, w1, b1, w2, b2, ws)
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
        needs = tuple(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, ws)) if training else None
        plan = BlockPlan(chosen, dispatch.kernel_variants(chosen, x, w1, ws, form, grad_dtype), form, needs,
                         x.dtype, mode, dispatch.signature(x, w1, ws, form) if chosen.may_fall_back else ())
        try:
            out = plan(x, w1, b1, w2, b2, ws)
        except Exception as error:  # the kernels failed on an unverified family: the torch backend, or raise
            chosen = dispatch.fall_back(chosen, dispatch.signature(x, w1, ws, form), error)
            plan = BlockPlan(chosen, (None, None), form, needs, x.dtype, mode)
            out = plan(x, w1, b1, w2, b2, ws)
        if key is not None and plan.forward is not None:
            cast = tuple(a is not b for a, b in zip((w1, b1, w2, b2, ws), given, strict=True))
            g1, gb1, g2, gb2, gs = given  # the guard checks the tensors a call passes (before any autocast cast)
            guard = signature_guard(x, g1, gb1, g2, gb2, *(() if gs is None else (gs,))) if (
                low is None and gb1 is not None and gb2 is not None) else None
            cached = Cached(key[0], guard, plan.entry() if low is None else AutocastPlan(plan, low, cast, out_dtype),
                            plan)
            store(key, cached)
            if guard is not None:
                _last = cached
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)


class Cached:
    """A block plan as stored: the facts a guard leaves out (the key's first part), the guard (``signature_guard``;
    None where there is none), what a call runs (``BlockPlan.entry`` or an ``AutocastPlan``) and the plan."""

    __slots__ = ("facts", "guard", "run", "plan")

    def __init__(self, facts: tuple, guard, run, plan: BlockPlan):
        self.facts, self.guard, self.run, self.plan = facts, guard, run, plan


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

    __slots__ = ("backend", "variants", "form", "training", "mode", "forward", "backwards", "needs", "keep",
                 "x_dtype", "chosen", "signature", "two", "keeps_all")

    def __init__(self, chosen: dispatch.Route, variants: tuple, form: Form, needs: tuple[bool, ...] | None,
                 x_dtype: torch.dtype, mode: int = saving.DEFAULT, signature: tuple = ()):
        self.chosen, self.signature = chosen, signature  # for dispatch.fall_back
        self.backend: Backend | None = chosen.backend
        # training: under the block's Function (the composite runs under PyTorch's own autograd instead)
        self.variants, self.form, self.training = variants, form, needs is not None and chosen.backend is not None
        self.mode = mode if needs is not None else saving.DEFAULT
        self.forward = None if chosen.backend is not None else composite.block_of_weights
        self.backwards: dict[tuple, object] = {}
        self.needs, self.x_dtype = needs, x_dtype
        self.keep = saving.block_keeps(form, needs, self.mode) if needs is not None else None
        self.two = self.keep is not None and saving.returns_hidden(self.keep)  # the Function's outputs: (out, hidden)
        # A training step's usual case: the Function keeps every slot but the signs, and sets to_save itself
        self.keeps_all = PLAIN_SAVE and self.keep == _KEEPS_ALL

    def entry(self):
        """What a cached call calls: in training the Function's C apply with this plan bound (a Function of the
        plan's own where it keeps every slot but the signs: ``_planned_function``), else the plan."""
        if not self.training:
            return self
        if self.keeps_all and self.forward is not None:
            return c_apply(_planned_function(self))
        return functools.partial(_train_block if self.two else _apply_block, self)

    def __call__(self, x, w1, b1, w2, b2, ws):
        if self.training:
            out = _apply_block(self, x, w1, b1, w2, b2, ws)
            return out[0] if self.two else out
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
        result, self.forward = planned(self.backend, "block_forward", (x, w1, b1, w2, b2, ws), self.form, save=save,
                                        variant=self.variants[0], **kwargs)
        return result

    def run_backward(self, dout, x, saved, out, w1, w2, ws, b1, bits):
        run, key = recorded_backward(self.backwards, dout)
        if run is not None:
            return run(dout, x, saved, out, w1, w2, ws, b1, bits)
        if dispatch.backward_builds_graph():
            return None  # the Function differentiates through the composite
        try:
            grads, run = planned(self.backend, "block_backward", (dout, x, saved, out, w1, w2, ws, b1, bits),
                                  self.form, self.needs, dx_dtype=self.x_dtype, variant=self.variants[1])
        except Exception as error:  # the kernels failed on an unverified family: the composite, or raise
            dispatch.fall_back(self.chosen, self.signature, error)
            return None
        if run is not None and dout.shape[0]:
            self.backwards[key] = run
        return grads


class ResidualBlockFunction(torch.autograd.Function):
    """The block's output and, where ``saving.returns_hidden`` (the plan's ``two``), its kept hidden layer, which a
    double backward differentiates through (``composite.block_grads``; else it recomputes it from ``x``)."""

    @staticmethod
    def forward(ctx, plan, x, w1, b1, w2, b2, ws):  # type: ignore[override]
        keep = plan.keep  # saving.KEPT's order
        run = plan.forward
        flat = x.dim() == 2
        if run is not None and flat:  # the cached call, written out
            out, kept = (run.function or run)(x, w1, b1, w2, b2, ws)
        else:
            out, kept = plan.run_forward(x if flat else rows(x), w1, b1, w2, b2, ws, keep[1], keep[3])
        ctx.plan = plan
        if not flat:
            ctx.x_shape = x.shape
        if plan.two:  # a gradient for one output alone: the other stays None
            ctx.set_materialize_grads(False)
        hidden = kept if keep[1] else None
        # Written out (this runs on every training call); the weights are always kept.
        saved = (x if keep[0] else None, hidden, out if keep[2] else None, kept if keep[3] else None, w1,
                 b1 if keep[5] else None, w2, ws)
        if PLAIN_SAVE:
            ctx.to_save = saved  # what save_for_backward does, without its frame (_functions.py)
        else:
            ctx.save_for_backward(*saved)
        if plan.two:
            return (out if flat else with_leading_dims(out, x, w2.shape[0])), hidden
        return out if flat else with_leading_dims(out, x, w2.shape[0])

    @staticmethod
    def backward(ctx, dout, dhidden=None):  # type: ignore[override]
        plan = ctx.plan
        saved = ctx.saved_tensors
        grads = None
        if dhidden is None:
            if dout is None:
                return (None,) * 7
            x, hidden, out, bits, w1, b1, w2, ws = saved
            # The cached call, written out; the plans' keys hold 2-D strides, so a hit is a 2-D gradient.
            run = plan.backwards.get((_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15))
            if run is not None:
                return (None, *(run.function or run)(dout, x, hidden, out, w1, w2, ws, b1, bits))
            flat = dout.dim() == 2
            grads = plan.run_backward(dout if flat else rows(dout), x if flat or x is None else rows(x), hidden, out,
                                      w1, w2, ws, b1, bits)
        if grads is None:  # a backward that builds a graph, or a gradient through the kept hidden layer
            if not plan.two:  # the hidden layer is computed again from x (kept where it is needed)
                saved = (saved[0], None, *saved[2:])
            grads = composite.block_grads(dout, dhidden, saved, plan.form, plan.needs, plan.x_dtype)
        dx = grads[0]
        x_shape = getattr(ctx, "x_shape", None)
        if dx is not None and x_shape is not None:
            dx = dx.view(x_shape)
        return (None, dx, *grads[1:])


_KEEPS_ALL = tuple(name != "signs" for name in saving.KEPT)  # (not two: x is kept)
_apply_block = c_apply(ResidualBlockFunction)
direct_backward(ResidualBlockFunction)


def _planned_function(plan: BlockPlan) -> type[torch.autograd.Function]:
    """``ResidualBlockFunction`` for one plan's cached training calls (``keeps_all``: x, the hidden layer and the
    output kept, one output), the plan bound in the class rather than passed to each apply and kept on each node
    (a microsecond of a step's few tens): the recorded forward, ``to_save`` set in ``KEPT``'s order, the backward's
    recorded steps for a gradient seen before; anything else through ``ResidualBlockFunction``'s own code."""
    run, get = plan.forward, plan.backwards.get

    class PlannedBlockFunction(ResidualBlockFunction):
        @staticmethod
        def forward(ctx, x, w1, b1, w2, b2, ws):  # type: ignore[override]
            if x.dim() != 2:
                return ResidualBlockFunction.forward(ctx, plan, x, w1, b1, w2, b2, ws)
            out, kept = (run.function or run)(x, w1, b1, w2, b2, ws)
            ctx.to_save = (x, kept, out, None, w1, b1, w2, ws)
            return out

        @staticmethod
        def backward(ctx, dout):  # type: ignore[override]
            if dout is not None:
                x, hidden, out, bits, w1, b1, w2, ws = ctx.saved_tensors
                step = get((_grad_enabled(), dout.dtype, dout.stride(), dout.data_ptr() & 15))
                if step is not None:
                    return (step.function or step)(dout, x, hidden, out, w1, w2, ws, b1, bits)
            ctx.plan = plan
            return ResidualBlockFunction.backward(ctx, dout)[1:]

    direct_backward(PlannedBlockFunction)
    return PlannedBlockFunction


def _train_block(plan: BlockPlan, x, w1, b1, w2, b2, ws):
    return _apply_block(plan, x, w1, b1, w2, b2, ws)[0]  # the output; the hidden layer serves double backward


# ---- the net without autograd ---------------------------------------------------------------------------------

def run_net_inference(x: Tensor, w_in: Tensor, b_in: Tensor | None,
                      blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                      b_out: Tensor | None) -> Tensor:
    """``linear(blocks(relu(linear(x))))`` of reference-form blocks without autograd or autocast (callers check both),
    validated here. A forced backend runs it as one unit where it has one (the Triton whole-net kernel), else
    layer by layer; ``auto`` runs each block as a block call (the whole-net kernel has no measured win yet)."""
    checks.net_operands(x, w_in, b_in, blocks, w_out, b_out)
    choice = dispatch.requested()
    x2d = rows(x)
    if choice in (dispatch.AUTO, dispatch.COMPOSITE_CHOICE):
        a = torch.relu_(F.linear(x2d, w_in, b_in))
        for w1, b1, w2, b2 in blocks:
            a = run_block(a, w1, b1, w2, b2, None, REFERENCE_FORM)
        y = F.linear(a, w_out, b_out)
    else:
        chosen = dispatch.forced(choice, x.device, x.dtype, REFERENCE_FORM)
        backend: Backend = chosen.backend  # type: ignore[assignment]
        if dispatch.net_as_one(chosen, x2d, w_in, b_in, blocks, w_out, b_out):
            y = backend.net_forward(x2d, w_in, b_in, blocks, w_out, b_out)
        else:
            a = backend.linear(x2d, w_in, b_in, "relu")
            if blocks:
                variant = dispatch.kernel_variants(chosen, a, blocks[0][0], None, REFERENCE_FORM, None)[0]
            for w1, b1, w2, b2 in blocks:
                a, _ = backend.block_forward(a, w1, b1, w2, b2, None, REFERENCE_FORM, save=False, variant=variant)
            y = backend.linear(a, w_out, b_out)
    return with_leading_dims(y, x, w_out.shape[0])
