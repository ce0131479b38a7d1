"""Operand validation (what ``nn.Linear`` raises, naming the operands) and autocast's casts, for the functional API
and the modules' first call at a signature.

Bad input raises what ``nn.Linear`` raises: TypeError for a non-tensor, RuntimeError for a wrong last dimension, a
dtype or a device mismatch, each naming what was involved; sparse tensors are refused with a RuntimeError.

Autocast: under ``torch.autocast`` the block computes what the reference block computes under it. The linears
run in the autocast dtype: weights and biases are cast to it here (``x`` is cast for its GEMMs by the backends).
The shortcut adds ``x`` itself, un-rounded; the result has the reference's dtype (``activations.Form
.output_dtype``): the reference block adds in place (``out += x``), so its output keeps the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activations import Form

# One C call that is False unless some autocast is on: keeps the common, autocast-free call cheap. Private in
# PyTorch (and folded to a constant by Dynamo); the per-device checks below decide when it is True.
any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)

# Device types with an autocast, found outside any compiled region: torch.amp.is_autocast_available is not
# traceable by Dynamo on every torch version this runs on (2.11 graph-breaks on it).
_AUTOCAST_DEVICE_TYPES: dict[str, bool] = {
    t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
}


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs a linear of ``x`` in, or None where no autocast applies to ``x``'s device."""
    device_type = x.device.type
    available = _AUTOCAST_DEVICE_TYPES.get(device_type)
    if available is None:
        if torch.compiler.is_compiling():
            return None
        available = _AUTOCAST_DEVICE_TYPES[device_type] = torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_eligible(t: object, device_type: str) -> bool:
    """Whether autocast casts ``t`` for a low-precision op: a floating tensor on its device, except float64."""
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def autocast(t: object, device_type: str, dtype: torch.dtype) -> object:
    return t.to(dtype) if autocast_eligible(t, device_type) else t  # type: ignore[union-attr]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_operands(op: str, x_name: str, x: object, names: tuple[str, ...], required: tuple[object, ...],
                    optional_names: tuple[str, ...], optional: tuple[object, ...], x_may_be_wider: bool = False,
                    ) -> None:
    """Types, layouts, dtypes and devices: every operand must be a dense tensor like ``x`` (``optional`` ones may
    be None). ``x_may_be_wider``: under autocast ``x`` keeps its own floating dtype. Names and operands come as
    parallel tuples: nothing is built on the common path."""
    if not _same_kind(x, required, optional, x_may_be_wider):
        operands = {**dict(zip(names, required, strict=True)),
                    **{k: v for k, v in zip(optional_names, optional, strict=True) if v is not None}}
        _raise_operand_error(op, x_name, x, operands, x_may_be_wider)


def _same_kind(x: object, required, optional, x_may_be_wider: bool) -> bool:
    """The common case, as plain loops: this runs on every call, where a 16-row block takes ~20 us in all."""
    if not isinstance(x, Tensor) or x.dim() == 0 or not x.is_floating_point() or x.layout != torch.strided:
        return False
    device = x.device
    dtype = None if x_may_be_wider else x.dtype  # under autocast the weights set the dtype
    for t in required:
        if not isinstance(t, Tensor) or t.device != device or t.layout != torch.strided:
            return False
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            return False
    for t in optional:
        if t is not None and (not isinstance(t, Tensor) or t.dtype != dtype or t.device != device
                              or t.layout != torch.strided):
            return False
    # Autocast leaves float64 alone: a float64 x with low-precision weights is F.linear's dtype error.
    return x.dtype != torch.float64 or dtype == torch.float64


def _raise_operand_error(op: str, x_name: str, x: object, operands: dict[str, object], x_may_be_wider: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}(): argument '{x_name}' must be a Tensor, not {type(x).__name__}")
    if x.layout != torch.strided:
        raise RuntimeError(f"{op}(): {x_name} must be a dense (strided) tensor, got layout {x.layout}; "
                           f"pass {x_name}.to_dense()")
    if x.dim() == 0:
        raise RuntimeError(f"{op}(): {x_name} must have at least 1 dimension, got a 0-d tensor")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"{op}(): expected a floating-point {x_name}, got {x.dtype}")
    reference_name, reference_dtype = x_name, x.dtype
    for name, t in operands.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}(): argument '{name}' must be a Tensor, not {type(t).__name__}")
        if t.layout != torch.strided:
            raise RuntimeError(f"{op}(): {name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.device != x.device:
            raise RuntimeError(
                f"{op}(): expected all tensors to be on the same device, but found {x_name} on {x.device} "
                f"and {name} on {t.device}"
            )
        if x_may_be_wider and reference_name == x_name:
            reference_name, reference_dtype = name, t.dtype  # autocast: the weights set the dtype
            continue
        if t.dtype != reference_dtype:
            raise RuntimeError(f"{op}(): expected {reference_name} and {name} to have the same dtype, but got "
                               f"{reference_dtype} and {t.dtype}")
    # Autocast leaves float64 alone: F.linear would refuse float64 x with low-precision weights.
    if x_may_be_wider and x.dtype == torch.float64 and reference_dtype != torch.float64:
        raise RuntimeError(f"{op}(): expected {x_name} and the weights to have the same dtype, but got "
                           f"{x.dtype} and {reference_dtype} (autocast does not cast float64)")


def check_linear(op: str, in_name: str, in_shape: tuple[int, ...], w: Tensor, w_name: str, b: Tensor | None) -> None:
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


_BLOCK_WEIGHTS = ("w1", "w2")
_BLOCK_OPTIONAL = ("b1", "b2", "shortcut_weight")


def _plain_block_call(x: object, w1: object, b1: object, w2: object, b2: object, ws: object) -> bool:
    """The common call, checked in one expression (every call runs this; a Python call costs about a microsecond
    there): dense floating tensors of one dtype and device, biases present, no shortcut weight. Anything else
    takes the general checks."""
    return (type(x) is Tensor and type(w1) is _Parameter and type(w2) is _Parameter and type(b1) is _Parameter
            and type(b2) is _Parameter and ws is None and x.layout is _strided and x.dim() > 0
            and x.dtype.is_floating_point and w1.dtype is x.dtype and w2.dtype is x.dtype and b1.dtype is x.dtype
            and b2.dtype is x.dtype and w1.layout is _strided and w2.layout is _strided and b1.layout is _strided
            and b2.layout is _strided and w1.device == x.device and w2.device == x.device
            and b1.device == x.device and b2.device == x.device)


_Parameter = torch.nn.Parameter
_strided = torch.strided


def _block_shapes_fit(xs: torch.Size, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                      ws: Tensor | None) -> bool:
    """The common case of ``_check_block_shapes`` in one expression (this runs on every call)."""
    w1s, w2s = w1.shape, w2.shape
    return (len(w1s) == 2 and len(w2s) == 2 and xs[-1] == w1s[1] and w2s[1] == w1s[0]
            and (b1 is None or b1.shape == w1s[:1]) and (b2 is None or b2.shape == w2s[:1])
            and (w2s[0] == xs[-1] if ws is None else ws.shape == (w2s[0], xs[-1])))


def _check_block_shapes(op: str, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                        ws: Tensor | None, activation: str) -> None:
    """The shape checks of the block's two linears and its shortcut: RuntimeError naming what does not fit."""
    check_linear(op, "x", x.shape, w1, "w1", b1)
    check_linear(op, f"{activation}(x @ w1.T + b1)", (*x.shape[:-1], w1.shape[0]), w2, "w2", b2)
    if ws is None:
        if x.shape[-1] != w2.shape[0]:
            raise RuntimeError(
                f"{op}(): the identity shortcut adds x of shape {_shape(x)} to an output with "
                f"{w2.shape[0]} features; pass shortcut_weight for a learned projection"
            )
    else:
        check_linear(op, "x", x.shape, ws, "shortcut_weight", None)
        if ws.shape[0] != w2.shape[0]:
            raise RuntimeError(f"{op}(): shortcut_weight of shape {_shape(ws)} must give "
                               f"{w2.shape[0]} output features like w2")


def block_operands(x: object, w1: object, b1: object, w2: object, b2: object, ws: object, form: Form,
                   op: str = "residual_block") -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None,
                                                        torch.dtype | None]:
    """``(w1, b1, w2, b2, ws, out_dtype)`` for a block call: the operands validated (RuntimeError or TypeError
    naming what does not fit), the weights cast to autocast's dtype where it is on, and the dtype the output must
    be converted to afterwards (None: the computed one)."""
    out_dtype = None
    if any_autocast_enabled() and isinstance(x, Tensor) and (low := autocast_dtype(x)) is not None:
        device_type = x.device.type
        w1, b1, w2, b2, ws = (autocast(t, device_type, low) for t in (w1, b1, w2, b2, ws))
        check_operands(op, "x", x, _BLOCK_WEIGHTS, (w1, w2), _BLOCK_OPTIONAL, (b1, b2, ws), x_may_be_wider=True)
        out_dtype = form.output_dtype(x.dtype, w1.dtype, ws is not None)
    elif not _plain_block_call(x, w1, b1, w2, b2, ws):
        check_operands(op, "x", x, _BLOCK_WEIGHTS, (w1, w2), _BLOCK_OPTIONAL, (b1, b2, ws))
    if not _block_shapes_fit(x.shape, w1, b1, w2, b2, ws):
        _check_block_shapes(op, x, w1, b1, w2, b2, ws, form.activation)
    return w1, b1, w2, b2, ws, out_dtype


def net_operands(x: Tensor, w_in: Tensor, b_in: Tensor | None,
                 blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                 b_out: Tensor | None) -> None:
    """Validate the operands of a net of reference-form blocks (``residual_net``)."""
    op = "residual_net"
    weights = {"w_in": w_in, "w_out": w_out}
    biases = {"b_in": b_in, "b_out": b_out}
    for i, (w1, b1, w2, b2) in enumerate(blocks):
        weights.update({f"blocks.{i}.w1": w1, f"blocks.{i}.w2": w2})
        biases.update({f"blocks.{i}.b1": b1, f"blocks.{i}.b2": b2})
    check_operands(op, "x", x, tuple(weights), tuple(weights.values()), tuple(biases), tuple(biases.values()))
    check_linear(op, "x", x.shape, w_in, "w_in", b_in)
    hidden_shape = (*x.shape[:-1], w_in.shape[0])
    for i, (w1, b1, w2, b2) in enumerate(blocks):
        check_linear(op, "hidden", hidden_shape, w1, f"blocks.{i}.w1", b1)
        check_linear(op, f"blocks.{i} hidden", (*x.shape[:-1], w1.shape[0]), w2, f"blocks.{i}.w2", b2)
        if w2.shape[0] != w_in.shape[0]:
            raise RuntimeError(f"{op}(): blocks.{i}.w2 of shape {_shape(w2)} must give {w_in.shape[0]} features "
                               "(the identity shortcut)")
    check_linear(op, "hidden", hidden_shape, w_out, "w_out", b_out)


def linear_residual_relu_operands(h: object, w: object, b: object, residual: object,
                                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(h, w, b)`` of a single-layer call validated, cast as autocast casts them (the GEMM operand ``h`` in the
    weights' dtype)."""
    op = "linear_residual_relu"
    if any_autocast_enabled() and isinstance(h, Tensor) and (low := autocast_dtype(h)) is not None:
        w, b = (autocast(t, h.device.type, low) for t in (w, b))
        check_operands(op, "h", h, ("w",), (w,), ("b",), (b,), x_may_be_wider=True)
        if not autocast_eligible(residual, h.device.type) and isinstance(residual, Tensor):
            check_operands(op, "h", h, ("residual",), (residual,), (), ())
    else:
        check_operands(op, "h", h, ("w", "residual"), (w, residual), ("b",), (b,))
    if not isinstance(residual, Tensor):
        raise TypeError(f"{op}(): argument 'residual' must be a Tensor, not {type(residual).__name__}")
    check_linear(op, "h", h.shape, w, "w", b)
    out_shape = (*h.shape[:-1], w.shape[0])
    if residual.shape != out_shape:
        raise RuntimeError(f"{op}(): residual of shape {_shape(residual)} must have the output's shape "
                           f"{tuple(out_shape)}")
    if h.dtype != w.dtype:  # autocast: the GEMM operand in the weights' dtype
        h = h.to(w.dtype)
    return h, w, b
