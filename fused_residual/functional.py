"""Functional forms of the fused ops: validate like ``nn.Linear``, flatten leading dims, call autograd.

- ``residual_block(x, w1, b1, w2, b2)``: ``relu(relu(x W1^T + b1) W2^T + b2 + x)`` (the whole block).
- ``linear_residual_relu(h, w, b, residual)``: ``relu(h W^T + b + residual)`` (the block's second layer).

Inputs may have any number of leading dims (1-D included) and any strides. Bad input raises what
``nn.Linear`` raises: TypeError for a non-tensor, RuntimeError for a wrong last dimension, a dtype or a device
mismatch, each naming what was involved.

Where a call goes:

- eager, grad needed: ``autograd.ResidualBlockFunction`` (one autograd node for the whole block);
- eager, no grad needed (``no_grad``, ``inference_mode``, frozen weights and input): the backend directly;
- while ``torch.compile`` / ``torch.export`` traces: the ops registered in ``ops.py``, which call the same backend
  functions (in eager they would only add dispatcher overhead, so eager calls skip them).

Autocast: under ``torch.autocast`` the block computes what the reference block computes under it. The reference
runs its linears in the autocast dtype, so ``h`` and ``linear2(h)`` are rounded to it, and ``+ x`` then promotes
to ``x``'s dtype (a projection shortcut is a linear too: no promotion). Here every operand autocast would cast
(floating, not float64, on the autocast device) is cast to the autocast dtype, the fused block runs in it, and
the result is cast to the reference's output dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autograd, ops
from .autograd import LinearResidualReluFunction, ResidualBlockFunction, needs_autograd

# One C call that is False unless some autocast is on: keeps the common, autocast-free call cheap. Private in
# PyTorch (and folded to a constant by Dynamo); the public per-device check below decides when it is True.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_enabled() -> bool:
    """Whether any autocast is on (then modules take the per-layer paths that follow its casting rules)."""
    return _any_autocast_enabled()


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype autocast runs a linear of ``x`` in, or None where no autocast applies to ``x``'s device."""
    if not isinstance(x, Tensor):
        return None
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(t: object, device_type: str, dtype: torch.dtype) -> object:
    """``t`` as autocast passes it to a low-precision op: floating tensors on its device, except float64, cast."""
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_operands(op: str, x: object, required: dict[str, object], optional: dict[str, object]) -> None:
    """Types, dtypes and devices: every operand must be a tensor like ``x`` (``optional`` ones may be None)."""
    if not _same_kind(x, required.values(), optional.values()):
        _raise_operand_error(op, x, {**required, **{k: v for k, v in optional.items() if v is not None}})


def _same_kind(x: object, required, optional) -> bool:
    """The common case, as plain loops: this runs on every call, where a 16-row block takes ~20 us in all."""
    if not isinstance(x, Tensor) or x.dim() == 0 or not x.is_floating_point():
        return False
    dtype, device = x.dtype, x.device
    for t in required:
        if not isinstance(t, Tensor) or t.dtype != dtype or t.device != device:
            return False
    for t in optional:
        if t is not None and (not isinstance(t, Tensor) or t.dtype != dtype or t.device != device):
            return False
    return True


def _raise_operand_error(op: str, x: object, operands: dict[str, object]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}(): argument 'x' must be a Tensor, not {type(x).__name__}")
    if x.dim() == 0:
        raise RuntimeError(f"{op}(): x must have at least 1 dimension, got a 0-d tensor")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"{op}(): expected a floating-point x, got {x.dtype}")
    for name, t in operands.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}(): argument '{name}' must be a Tensor, not {type(t).__name__}")
        if t.dtype != x.dtype:
            raise RuntimeError(
                f"{op}(): expected x and {name} to have the same dtype, but got {x.dtype} and {t.dtype}"
            )
        if t.device != x.device:
            raise RuntimeError(
                f"{op}(): expected all tensors to be on the same device, but found x on {x.device} "
                f"and {name} on {t.device}"
            )


def _check_linear(op: str, in_name: str, in_shape: tuple[int, ...], w: Tensor, w_name: str, b: Tensor | None) -> None:
    """The shape checks ``F.linear`` makes, with messages that name the operands."""
    if w.dim() != 2:
        raise RuntimeError(f"{op}(): {w_name} must be 2-D (out_features, in_features), got shape {_shape(w)}")
    if in_shape[-1] != w.shape[1]:
        raise RuntimeError(
            f"{op}(): {in_name} of shape {tuple(in_shape)} has last dimension {in_shape[-1]}, but {w_name} of "
            f"shape {_shape(w)} expects in_features={w.shape[1]}"
        )
    if b is not None and b.shape != (w.shape[0],):
        raise RuntimeError(f"{op}(): bias of shape {_shape(b)} does not match {w_name} of shape {_shape(w)}")


def residual_block(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    shortcut_weight: Tensor | None = None,
) -> Tensor:
    """``relu(relu(x @ w1.T + b1) @ w2.T + b2 + s)`` with ``s = x`` or ``s = x @ shortcut_weight.T``.

    Shapes: ``x (..., K)``, ``w1 (N, K)``, ``w2 (N, N)``, ``b1, b2 (N,)`` or None, ``shortcut_weight (N, K)``;
    without a shortcut weight ``K`` must equal ``N``. Returns ``(..., N)``.
    """
    op = "residual_block"
    out_dtype = None
    if _any_autocast_enabled() and (low := _autocast_dtype(x)) is not None:
        # The reference's last step is linear2(h) + x (promotes to x's dtype) or + shortcut(x) (stays low).
        out_dtype = low if shortcut_weight is not None else torch.promote_types(low, x.dtype)
        device_type = x.device.type
        x, w1, b1, w2, b2, shortcut_weight = (_autocast(t, device_type, low)
                                               for t in (x, w1, b1, w2, b2, shortcut_weight))
    _check_operands(op, x, {"w1": w1, "w2": w2}, {"b1": b1, "b2": b2, "shortcut_weight": shortcut_weight})
    _check_linear(op, "x", x.shape, w1, "w1", b1)
    _check_linear(op, "relu(x @ w1.T + b1)", (*x.shape[:-1], w1.shape[0]), w2, "w2", b2)
    if shortcut_weight is None:
        if x.shape[-1] != w2.shape[0]:
            raise RuntimeError(
                f"{op}(): the identity shortcut adds x of shape {_shape(x)} to an output with "
                f"{w2.shape[0]} features; pass shortcut_weight for a learned projection"
            )
    else:
        _check_linear(op, "x", x.shape, shortcut_weight, "shortcut_weight", None)
        if shortcut_weight.shape[0] != w2.shape[0]:
            raise RuntimeError(f"{op}(): shortcut_weight of shape {_shape(shortcut_weight)} must give "
                               f"{w2.shape[0]} output features like w2")

    if torch.compiler.is_compiling():
        out = ops.residual_block(x, w1, b1, w2, b2, shortcut_weight)
    elif needs_autograd(x, w1, b1, w2, b2, shortcut_weight):
        out = ResidualBlockFunction.apply(x, w1, b1, w2, b2, shortcut_weight)
    else:
        out = autograd.block_forward(x, w1, b1, w2, b2, shortcut_weight)
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)


def residual_net_inference(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor,
    b_out: Tensor | None,
) -> Tensor:
    """``linear(blocks(relu(linear(x))))`` for inference: no autograd, no autocast (callers check both).

    ``blocks`` holds each block's ``(w1, b1, w2, b2)``. Where the widths allow, the Triton backend runs the
    whole net in one kernel (activations never leave the chip).
    """
    op = "residual_net"
    weights = {"w_in": w_in, "w_out": w_out}
    biases = {"b_in": b_in, "b_out": b_out}
    for i, (w1, b1, w2, b2) in enumerate(blocks):
        weights.update({f"blocks.{i}.w1": w1, f"blocks.{i}.w2": w2})
        biases.update({f"blocks.{i}.b1": b1, f"blocks.{i}.b2": b2})
    _check_operands(op, x, weights, biases)
    _check_linear(op, "x", x.shape, w_in, "w_in", b_in)
    hidden_shape = (*x.shape[:-1], w_in.shape[0])
    for i, (w1, b1, w2, b2) in enumerate(blocks):
        _check_linear(op, "hidden", hidden_shape, w1, f"blocks.{i}.w1", b1)
        _check_linear(op, "hidden", hidden_shape, w2, f"blocks.{i}.w2", b2)
    _check_linear(op, "hidden", hidden_shape, w_out, "w_out", b_out)
    return autograd.net_forward(x, w_in, b_in, blocks, w_out, b_out)


def linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)``: ``h (..., K)``, ``w (N, K)``, ``b (N,)`` or None, ``residual (..., N)``."""
    op = "linear_residual_relu"
    out_dtype = None
    if _any_autocast_enabled() and (low := _autocast_dtype(h)) is not None:
        # As F.linear(h, w, b) + residual under autocast: the sum promotes to the residual's dtype.
        out_dtype = torch.promote_types(low, residual.dtype) if isinstance(residual, Tensor) else None
        device_type = h.device.type
        h, w, b, residual = (_autocast(t, device_type, low) for t in (h, w, b, residual))
    _check_operands(op, h, {"w": w, "residual": residual}, {"b": b})
    _check_linear(op, "h", h.shape, w, "w", b)
    out_shape = (*h.shape[:-1], w.shape[0])
    if residual.shape != out_shape:
        raise RuntimeError(f"{op}(): residual of shape {_shape(residual)} must have the output's shape "
                           f"{tuple(out_shape)}")
    if torch.compiler.is_compiling():
        out = ops.linear_residual_relu(h, w, b, residual)
    elif needs_autograd(h, w, b, residual):
        out = LinearResidualReluFunction.apply(h, w, b, residual)
    else:
        out = autograd.linear_residual_relu_forward(h, w, b, residual)
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)
