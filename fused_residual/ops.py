"""The fused ops registered with ``torch.library``, so ``torch.compile`` keeps them in one graph.

``functional`` routes here only while Dynamo traces (``torch.compiler.is_compiling()``); eager calls go
straight to ``autograd`` (a registered op costs a dispatcher round trip per call). The ops hold no math: each
implementation is one call into ``backends.select(x)``, the same functions the eager path calls, and their
autograd keeps the same tensors as the eager path (``autograd.save_block`` / ``autograd.save_linear``).

Ops (all tensors 2-D; ``functional`` validates and ``residual_block`` / ``linear_residual_relu`` below flatten):

- ``fused_residual::block_forward(x, w1, b1?, w2, b2?, ws?) -> (out, h)``
- ``fused_residual::block_backward(dout, x?, h, out, w1, w2, ws?, needs) -> [the grads ``needs`` asks for]``
- ``fused_residual::linear_residual_relu_forward(h, w, b?, residual) -> out``
- ``fused_residual::linear_residual_relu_backward(dout, h?, out, w, needs) -> [the grads ``needs`` asks for]``

Unlike the eager ``autograd.Function``, which keeps its forward's backend for backward, the backward ops ask
``backends.select`` again when they run (a compiled graph cannot carry a module object): both backends keep the
same tensors, so changing ``FUSED_RESIDUAL_BACKEND`` between a forward and its backward is still correct.

Why ``custom_op`` and not ``triton_op``: the ops are opaque to Inductor, so the backend (read from
``FUSED_RESIDUAL_BACKEND`` at every call), the Triton launch code and its autotuning run exactly as in eager,
on any device; tensors written by Triton and saved for backward need no special handling, and no Python
float is turned into an fp64 kernel argument by Inductor's codegen (the schemas have no float arguments).
A backward op returns a list holding only the gradients asked for, since a custom op cannot return None.
The fakes promise row-major outputs, which Inductor plans its memory by; the backends promise no layout (eager
autograd takes any), so the ops make sure with ``.contiguous()`` (free where a backend wrote them row-major).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autograd, backends

_NAMESPACE = "fused_residual"


def _spread(grads: list[Tensor], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """A backward op's list of asked-for gradients, back in one slot per input (None where not asked)."""
    it = iter(grads)
    return tuple(next(it) if need else None for need in needs)


# ---- the whole block -------------------------------------------------------------------------------------

@torch.library.custom_op(
    f"{_NAMESPACE}::block_forward",
    mutates_args=(),
    schema="(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? ws) -> (Tensor, Tensor)",
)
def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(out, h)`` of the block for 2-D ``x``."""
    out, h = backends.select(x).block_forward(x, w1, b1, w2, b2, ws)
    return out.contiguous(), h.contiguous()


@block_forward.register_fake
def _(x, w1, b1, w2, b2, ws):
    rows, features = x.shape[0], w1.shape[0]
    return x.new_empty(rows, features), x.new_empty(rows, features)


@torch.library.custom_op(
    f"{_NAMESPACE}::block_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor? x, Tensor h, Tensor out, Tensor w1, Tensor w2, Tensor? ws, bool[] needs) "
    "-> Tensor[]",
)
def block_backward(
    dout: Tensor, x: Tensor | None, h: Tensor, out: Tensor, w1: Tensor, w2: Tensor, ws: Tensor | None,
    needs: list[bool],
) -> list[Tensor]:
    """The gradients ``(dx, dw1, db1, dw2, db2, dws)`` that ``needs`` asks for, in that order."""
    grads = backends.select(dout).block_backward(dout, x, h, out, w1, w2, ws, tuple(needs))
    return [g.contiguous() for g in grads if g is not None]


@block_backward.register_fake
def _(dout, x, h, out, w1, w2, ws, needs):
    rows = dout.shape[0]
    shapes = [(rows, w1.shape[1]), w1.shape, w1.shape[:1], w2.shape, w2.shape[:1], None if ws is None else ws.shape]
    return [dout.new_empty(shape) for shape, need in zip(shapes, needs, strict=True) if need]


def _setup_block(ctx, inputs, output) -> None:
    x, w1, _, w2, _, ws = inputs
    out, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    autograd.save_block(ctx, x, h, out, w1, w2, ws)


def _block_backward(ctx, dout, _dh):
    needs = tuple(ctx.needs_input_grad[:6])  # (older PyTorch appended a flag for an internal argument)
    if dout is None:
        return (None,) * len(needs)
    return _spread(torch.ops.fused_residual.block_backward(dout, *ctx.saved_tensors, list(needs)), needs)


block_forward.register_autograd(_block_backward, setup_context=_setup_block)


# ---- the single layer ------------------------------------------------------------------------------------

@torch.library.custom_op(
    f"{_NAMESPACE}::linear_residual_relu_forward",
    mutates_args=(),
    schema="(Tensor h, Tensor w, Tensor? b, Tensor residual) -> Tensor",
)
def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)`` for 2-D ``h`` and ``residual``."""
    return backends.select(h).linear_residual_relu_forward(h, w, b, residual).contiguous()


@linear_residual_relu_forward.register_fake
def _(h, w, b, residual):
    return h.new_empty(h.shape[0], w.shape[0])


@torch.library.custom_op(
    f"{_NAMESPACE}::linear_residual_relu_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor? h, Tensor out, Tensor w, bool[] needs) -> Tensor[]",
)
def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: list[bool]
) -> list[Tensor]:
    """The gradients ``(dh, dw, db, dresidual)`` that ``needs`` asks for, in that order."""
    grads = backends.select(dout).linear_residual_relu_backward(dout, h, out, w, tuple(needs))
    return [g.contiguous() for g in grads if g is not None]


@linear_residual_relu_backward.register_fake
def _(dout, h, out, w, needs):
    rows = dout.shape[0]
    shapes = [(rows, w.shape[1]), w.shape, w.shape[:1], dout.shape]
    return [dout.new_empty(shape) for shape, need in zip(shapes, needs, strict=True) if need]


def _setup_linear(ctx, inputs, output) -> None:
    h, w, _, _ = inputs
    ctx.set_materialize_grads(False)
    autograd.save_linear(ctx, h, output, w)


def _linear_backward(ctx, dout):
    needs = tuple(ctx.needs_input_grad[:4])
    if dout is None:
        return (None,) * len(needs)
    return _spread(torch.ops.fused_residual.linear_residual_relu_backward(dout, *ctx.saved_tensors, list(needs)), needs)


linear_residual_relu_forward.register_autograd(_linear_backward, setup_context=_setup_linear)


# ---- what functional calls while compiling ---------------------------------------------------------------

def residual_block(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None
) -> Tensor:
    """The block through the registered op: ``x`` of any leading dims, output with the same leading dims."""
    out, _ = torch.ops.fused_residual.block_forward(autograd.rows(x), w1, b1, w2, b2, ws)
    return autograd.with_leading_dims(out, x, w2.shape[0])


def linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """The single layer through the registered op, leading dims kept like ``residual_block``."""
    out = torch.ops.fused_residual.linear_residual_relu_forward(autograd.rows(h), w, b, autograd.rows(residual))
    return autograd.with_leading_dims(out, h, w.shape[0])
