"""The fused ops registered with ``torch.library``, so ``torch.compile`` keeps them in one graph.

``dispatch`` sends a call here only while ``torch.compile`` traces (``torch.compiler.is_compiling()``, and not
``torch.compiler.is_exporting()``: see "Export" below), and only where a backend of ours may run the call (where
the route is the plain composite, the compiler sees the composite itself and fuses it as it fuses the reference);
eager calls go straight to the Functions of ``plans.py`` (a registered op costs a dispatcher round trip per call).
The callers (``plans.py``) call the ops through ``torch.ops.fused_residual``: this module registers them and is
imported by the package's ``__init__``; it calls down and nothing imports it back. The ops hold no math: each
implementation asks ``dispatch.backend_route`` for the call's backend and ``dispatch.kernel_variants`` for its
kernels, the same decisions an eager call gets (the plain-composite route runs the ``torch`` backend here: inside
an op there is no autograd to see it), and their autograd keeps the same tensors as the eager path
(``saving.block_keeps`` / ``layer_plans.save_linear``).

Ops (all tensors 2-D; callers flatten):

- ``fused_residual::block_forward(x, w1, b1?, w2, b2?, ws?, activation, final_activation?, mode, save_hidden,
  save_signs) -> (out, kept)``
- ``fused_residual::block_backward(dout, x?, saved?, out?, w1, w2, ws?, b1?, signs?, activation, final_activation?,
  needs, dx_dtype) -> [the grads needs asks for]``
- ``fused_residual::linear_residual_relu_forward(h, w, b?, residual) -> out``
- ``fused_residual::linear_residual_relu_backward(dout, h?, out, w, needs, dh_dtype) -> [the grads needs asks for]``

The backward ops route again when they run (a compiled graph cannot carry a backend object): every backend keeps
the same tensors, so changing ``FUSED_RESIDUAL_BACKEND`` between a forward and its backward is still correct.

Why ``custom_op`` and not ``triton_op``: the ops are opaque to Inductor, so the backend (read from
``FUSED_RESIDUAL_BACKEND`` at every call), the Triton launch code and its autotuning run exactly as in eager, on
any device, the Triton interpreter included; tensors written by Triton and saved for backward need no special
handling, and no Python float is turned into an fp64 kernel argument by Inductor's codegen (the schemas have no
float arguments). A backward op returns a list holding only the gradients asked for, since a custom op cannot
return None. The fakes promise row-major outputs, which Inductor plans its memory by; backends promise
row-major outputs too, and the ops make sure with ``.contiguous()`` (free where a backend wrote them row-major).

**Export.** While ``torch.export`` traces (``torch.compiler.is_exporting()``), ``dispatch`` sends the block to
``composite.py`` instead of these ops: the exported program holds only aten ops (``linear``, the activation,
``add``, ``relu``: the ops the reference modules export to, with the same dtypes under autocast, since it is the
same code), so ``torch.onnx.export(..., dynamo=True)``, ``run_decompositions()``, AOTInductor and
``torch.export.save``/``load`` need nothing from this package. The alternatives, and why not:

- A decomposition registered on the ops as a ``CompositeImplicitAutograd`` kernel, which
  ``torch.export.default_decompositions()`` (and so ``run_decompositions()`` and the ONNX exporter) would pick up:
  make_fx and FakeTensor run such a kernel whenever the op has no kernel of its own for the tensors' device type,
  and that is also the only case in which ``run_decompositions`` runs it. So either ``torch.compile`` decomposes
  the ops too and loses our kernels (implementation registered for all devices), or ``run_decompositions`` keeps
  them (implementation registered per device type); both were tried.
- An entry per op in a decomposition table passed to ``run_decompositions``: it runs below functionalization, so
  it must be free of in-place ops, which ``composite.py`` uses; it would be a second copy of the block's math
  (and its autocast dtype rules) to keep in step, and every user would have to pass the table, as with an ONNX
  ``custom_translation_table``.
- Exporting the ops themselves: AOTInductor then packages each as a call back into this Python code at run time
  (its proxy executor), not as a kernel: the package needs Python and this package to run.

Our Triton kernels are never in an exported artifact: Inductor (or the target runtime) compiles the aten graph.
``torch.library.triton_op`` would let Inductor and AOTInductor see and embed them, but its ``wrap_triton``
launches cannot run in the Triton interpreter, which is how every kernel is tested without a GPU, and it would fix
the backend choice (``FUSED_RESIDUAL_BACKEND``, the dispatch tables) at trace time; see the README, "Deploying".
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, composite, dispatch, plans, saving, signs
from ._tensors import rows_facts, tensor_facts
from .activations import REFERENCE_FORM, Form
from .backends import Backend
from .layer_plans import save_linear


def run_op(backend: Backend, name: str, tensors: tuple, *args, **kwargs) -> tuple:
    """``backend.<name>(*tensors, *args, **kwargs)`` (a tuple) for a registered op (what a compiled graph calls),
    through a plan keyed by each tensor's facts (those with the call's rows as in a call's key), the
    arguments and TF32, so that later calls replay recorded steps."""
    key = None
    if plans.ENABLED:
        try:
            with_rows = _OP_ROWS[name]
            facts = (rows_facts(t)[1] if i in with_rows and t is not None else tensor_facts(t)
                     for i, t in enumerate(tensors))
            key = ("op", backend.NAME, name, *facts, args, tuple(kwargs.items()),
                   tensors[0].dtype is torch.float32 and plans._tf32())
            run = plans._plans[key]
        except Exception:  # a new signature, or facts the key cannot hold
            pass
        else:
            return run(*tensors)  # type: ignore[operator]
    result, run = plans.planned(backend, name, tensors, *args, **kwargs)
    if key is not None and run is not None and tensors[0].shape[0]:
        plans.store(key, run)
    return result


# The operands of each op that have the call's rows (the rest have fixed shapes).
_OP_ROWS = {"block_forward": (0,), "block_backward": (0, 1, 2, 3, 8), "linear_residual_relu_forward": (0, 3),
            "linear_residual_relu_backward": (0, 1, 2)}


_NAMESPACE = "fused_residual"


def _backend(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, grad_dtype: torch.dtype | None = None,
             ) -> tuple[backends.Backend, tuple[str | None, str | None]]:
    """The backend for a call inside an op, and its (forward, backward) kernel variants."""
    chosen = dispatch.backend_route(x, w1, ws, form, training=True)
    if chosen.backend is None:
        chosen = dispatch.Route(backends.get("torch"))
    return chosen.backend, dispatch.kernel_variants(chosen, x, w1, ws, form, grad_dtype)


def _spread(grads: list[Tensor], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """A backward op's list of asked-for gradients, back in one slot per input (None where not asked)."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in needs)


# ---- the whole block -------------------------------------------------------------------------------------

@torch.library.custom_op(
    f"{_NAMESPACE}::block_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? ws, str activation, "
    "str? final_activation, int mode, bool save_hidden, bool save_signs) -> (Tensor, Tensor)",
)
def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None, activation: str,
    final_activation: str | None, mode: int, save_hidden: bool, save_signs: bool,
) -> tuple[Tensor, Tensor]:
    """``(out, kept)`` of the block for 2-D ``x``: ``kept`` the hidden layer (``save_hidden``), the final ReLU's
    packed sign bits (``save_signs``, a recompute block) or an empty tensor. ``mode``: the block's saving mode
    (``saving.py``), which decides with the needs what the autograd keeps."""
    form = Form(activation, final_activation)
    backend, variants = _backend(x, w1, ws, form)
    kwargs = {"signs": True} if save_signs else {}
    out, kept = run_op(backend, "block_forward", (x, w1, b1, w2, b2, ws), form, save=save_hidden,
                       variant=variants[0], **kwargs)
    if not (save_hidden or save_signs):
        kept = x.new_empty(0, dtype=w1.dtype)
    return out.contiguous(), kept.contiguous()


@block_forward.register_fake
def _(x, w1, b1, w2, b2, ws, activation, final_activation, mode, save_hidden, save_signs):
    out_dtype = Form(activation, final_activation).output_dtype(x.dtype, w1.dtype, ws is not None)
    out = x.new_empty(x.shape[0], w2.shape[0], dtype=out_dtype)
    if save_hidden:
        return out, x.new_empty(x.shape[0], w1.shape[0], dtype=w1.dtype)
    if save_signs:
        return out, x.new_empty(x.shape[0], signs.row_bytes(w2.shape[0]), dtype=torch.uint8)
    return out, x.new_empty(0, dtype=w1.dtype)


@torch.library.custom_op(
    f"{_NAMESPACE}::block_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor? x, Tensor? saved, Tensor? out, Tensor w1, Tensor w2, Tensor? ws, Tensor? b1, "
    "Tensor? signs, str activation, str? final_activation, bool[] needs, ScalarType dx_dtype) -> Tensor[]",
)
def block_backward(
    dout: Tensor, x: Tensor | None, saved: Tensor | None, out: Tensor | None, w1: Tensor, w2: Tensor,
    ws: Tensor | None, b1: Tensor | None, bits: Tensor | None, activation: str, final_activation: str | None,
    needs: list[bool], dx_dtype: torch.dtype,
) -> list[Tensor]:
    """The gradients ``(dx, dw1, db1, dw2, db2, dws)`` that ``needs`` asks for, in that order."""
    form = Form(activation, final_activation)
    backend, variants = _backend(dout if x is None else x, w1, ws, form, dout.dtype)
    grads = run_op(backend, "block_backward", (dout, x, saved, out, w1, w2, ws, b1, bits), form, tuple(needs),
                   dx_dtype=dx_dtype, variant=variants[1])
    return [g.contiguous() for g in grads if g is not None]


@block_backward.register_fake
def _(dout, x, saved, out, w1, w2, ws, b1, bits, activation, final_activation, needs, dx_dtype):
    rows_ = dout.shape[0]
    shapes = [(rows_, w1.shape[1]), w1.shape, w1.shape[:1], w2.shape, w2.shape[:1], None if ws is None else ws.shape]
    dtypes = [dx_dtype, *(w1.dtype,) * 5]
    return [dout.new_empty(shape, dtype=dtype)
            for shape, dtype, need in zip(shapes, dtypes, needs, strict=True) if need]


def _setup_block(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, ws, activation, final_activation, mode, save_hidden, save_signs = inputs
    out, kept = output
    ctx.form, ctx.x_dtype = Form(activation, final_activation), x.dtype
    if not save_hidden:
        ctx.mark_non_differentiable(kept)
    ctx.set_materialize_grads(False)
    keep = saving.block_keeps(ctx.form, ctx.needs_input_grad, mode)
    tensors = (x, kept if save_hidden else None, out, kept if save_signs else None, w1, b1, w2, ws)
    ctx.save_for_backward(*(t if k else None for t, k in zip(tensors, keep, strict=True)))


def _block_backward(ctx, dout, dkept):
    needs = tuple(ctx.needs_input_grad[:6])
    if dout is None and dkept is None:
        return (None,) * 11
    saved = ctx.saved_tensors
    if dkept is not None or dispatch.backward_builds_graph():  # a graph, or a gradient through the hidden layer
        return (*composite.block_grads(dout, dkept, saved, ctx.form, needs, ctx.x_dtype), *(None,) * 5)
    x, hidden, out, bits, w1, b1, w2, ws = saved
    grads = torch.ops.fused_residual.block_backward(dout, x, hidden, out, w1, w2, ws, b1, bits, *ctx.form,
                                                    list(needs), ctx.x_dtype)
    return (*_spread(grads, needs), *(None,) * 5)


block_forward.register_autograd(_block_backward, setup_context=_setup_block)


# ---- the single layer ------------------------------------------------------------------------------------

@torch.library.custom_op(
    f"{_NAMESPACE}::linear_residual_relu_forward",
    mutates_args=(),
    schema="(Tensor h, Tensor w, Tensor? b, Tensor residual) -> Tensor",
)
def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)`` for 2-D ``h`` and ``residual``."""
    backend, _ = _backend(h, w, None, REFERENCE_FORM)
    return run_op(backend, "linear_residual_relu_forward", (h, w, b, residual))[0].contiguous()


@linear_residual_relu_forward.register_fake
def _(h, w, b, residual):
    return h.new_empty(h.shape[0], w.shape[0], dtype=torch.promote_types(h.dtype, residual.dtype))


@torch.library.custom_op(
    f"{_NAMESPACE}::linear_residual_relu_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor? h, Tensor out, Tensor w, bool[] needs, ScalarType dh_dtype) -> Tensor[]",
)
def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: list[bool], dh_dtype: torch.dtype,
) -> list[Tensor]:
    """The gradients ``(dh, dw, db, dresidual)`` that ``needs`` asks for, in that order."""
    backend, _ = _backend(dout, w, None, REFERENCE_FORM)
    grads = run_op(backend, "linear_residual_relu_backward", (dout, h, out, w), tuple(needs), dh_dtype=dh_dtype)
    return [g.contiguous() for g in grads if g is not None]


@linear_residual_relu_backward.register_fake
def _(dout, h, out, w, needs, dh_dtype):
    rows_ = dout.shape[0]
    shapes = [(rows_, w.shape[1]), w.shape, w.shape[:1], dout.shape]
    dtypes = [dh_dtype, w.dtype, w.dtype, out.dtype]
    return [dout.new_empty(shape, dtype=dtype) for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)
            if need]


def _setup_linear(ctx, inputs, output) -> None:
    h, w, _, _ = inputs
    ctx.h_dtype = h.dtype
    ctx.set_materialize_grads(False)
    save_linear(ctx, h, output, w)


def _linear_backward(ctx, dout):
    needs = tuple(ctx.needs_input_grad[:4])
    if dout is None:
        return (None,) * len(needs)
    h, out, w = ctx.saved_tensors
    if dispatch.backward_builds_graph():
        return composite.linear_grads(dout, h, out, w, needs, ctx.h_dtype)
    grads = torch.ops.fused_residual.linear_residual_relu_backward(dout, h, out, w, list(needs), ctx.h_dtype)
    return _spread(grads, needs)


linear_residual_relu_forward.register_autograd(_linear_backward, setup_context=_setup_linear)
