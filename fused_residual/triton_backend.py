"""The ``triton`` backend: the block's forward and backward as fused-epilogue GEMM kernels.

Same interface, saved tensors and semantics as ``fallback.py``. Each function is one whole-block launch where
the rule below allows it, else a short sequence of ``kernels.fused_linear`` launches (the kernel files document
the math, bytes and grid):

forward   h   = relu(x W1^T + b1)                       bias + ReLU epilogue
          out = relu(h W2^T + b2 + x)                   bias + residual + ReLU epilogue
                relu([h | x] [W2 | Ws]^T + b2)          projection: the shortcut joins the GEMM along K
backward  g2  = dout * (out > 0)                        one elementwise pass (aten.threshold_backward)
          g1  = (g2 W2) * (h > 0)                       gate epilogue
          dx  = g1 W1 + g2        | [g1 | g2] [W1; Ws]  residual epilogue | second operand
          dW2 = g2^T h, db2 = rows of g2^T              split-K GEMM with fused row sums (deterministic)
          dW1 = g1^T x, db1 = rows of g1^T              same;  dWs = g2^T x

Zero-size batches return before any launch.

Whole-block kernels (``kernels/whole_block.py``) replace the two-GEMM sequence where the weights fit on chip.
The one rule: identity shortcut, and the width padded to a power of two >= 16 is at most
``MAX_FORWARD_WIDTH[element size]`` (forward; also its shared-memory bound within the device's opt-in shared
memory per block, read from the device) or ``max_backward_width(device capability)`` (backward).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .kernels import whole_block, whole_net
from .kernels._common import multiprocessors
from .kernels.fused_linear import fused_linear

_relu_backward = torch.ops.aten.threshold_backward


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T + b``."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return fused_linear(x, w.t(), bias=b)[0]


def linear_relu(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``relu(x @ w.T + b)``."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return fused_linear(x, w.t(), bias=b, relu=True)[0]


def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)``."""
    if h.shape[0] == 0:
        return h.new_empty((0, w.shape[0]))
    return fused_linear(h, w.t(), bias=b, residual=residual, relu=True)[0]


@functools.cache
def _max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` (the interpreter has no limit that matters)."""
    if device.type != "cuda":
        return 1 << 30
    import triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def whole_block_forward_fits(x: Tensor, ws: Tensor | None) -> bool:
    if ws is not None:
        return False
    width, size = whole_block.padded_width(x.shape[1]), x.element_size()
    return (width <= whole_block.MAX_FORWARD_WIDTH[size]
            and whole_block.forward_shared_bytes(width, 128, size) <= _max_shared_memory(x.device))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def whole_block_backward_fits(out: Tensor, ws: Tensor | None) -> bool:
    return ws is None and (whole_block.padded_width(out.shape[1])
                           <= whole_block.max_backward_width(_capability(out.device)))


def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
    need_h: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(out, h)`` of the block; see ``fallback.block_forward``. ``h`` is None when not ``need_h`` and the
    whole-block kernel kept it on chip."""
    if whole_block_forward_fits(x, ws):
        return whole_block.forward(x, w1, b1, w2, b2, store_h=need_h)
    h = linear_relu(x, w1, b1)
    if ws is None:
        return linear_residual_relu_forward(h, w2, b2, x), h
    if x.shape[0] == 0:
        return x.new_empty((0, w2.shape[0])), h
    return fused_linear(h, w2.t(), a2=x, b2=ws.t(), bias=b2, relu=True)[0], h


def _split_k(rows: int, cols: int, k: int, device: torch.device) -> int:
    """Slices of K for a weight-gradient GEMM: enough tiles to fill the GPU, each slice >= 1024 rows deep."""
    tiles = -(-rows // 128) * -(-cols // 128)
    want = max(1, 2 * multiprocessors(device) // tiles)
    return max(1, min(want, k // 1024, 64))


def _weight_grad(g: Tensor, a: Tensor, need_w: bool, need_b: bool, dtype: torch.dtype):
    """``(g^T a, column sums of g)``, each only if asked, in ``dtype``."""
    if g.shape[0] == 0:  # an empty batch: zero gradients, no launch
        zeros = g.new_zeros((g.shape[1],), dtype=dtype)
        return (g.new_zeros((g.shape[1], a.shape[1]), dtype=dtype) if need_w else None), (zeros if need_b else None)
    if not need_w:
        return None, (g.sum(0, dtype=torch.float32).to(dtype) if need_b else None)
    split = _split_k(g.shape[1], a.shape[1], g.shape[0], g.device)
    dw, db = fused_linear(g.t(), a, rowsum=need_b, split_k=split, out_dtype=dtype)
    return dw, (db.to(dtype) if db is not None else None)


def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dh, dw, db, dresidual)``; see ``fallback.linear_residual_relu_backward``."""
    g = _relu_backward(dout, out, 0)
    dh = fused_linear(g, w)[0] if needs[0] else None
    dw, db = _weight_grad(g, h, needs[1], needs[2], w.dtype)
    return dh, dw, db, (g if needs[3] else None)


def block_backward(
    dout: Tensor,
    x: Tensor | None,
    h: Tensor,
    out: Tensor,
    w1: Tensor,
    w2: Tensor,
    ws: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dw1, db1, dw2, db2, dws)``; see ``fallback.block_backward``."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    need_weights = need_w1 or need_b1 or need_w2 or need_b2
    if whole_block_backward_fits(out, ws) and (need_x or need_weights):
        dx, dw1, db1, dw2, db2 = whole_block.backward(dout, out, h, x, w1, w2, need_dx=need_x,
                                                      need_weights=need_weights)
        return (dx, dw1 if need_w1 else None, db1 if need_b1 else None, dw2 if need_w2 else None,
                db2 if need_b2 else None, None)
    g2 = _relu_backward(dout, out, 0)
    dw2, db2 = _weight_grad(g2, h, need_w2, need_b2, w2.dtype)
    dws = _weight_grad(g2, x, True, False, ws.dtype)[0] if need_ws else None
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        g1 = fused_linear(g2, w2, gate=h)[0]
        dw1, db1 = _weight_grad(g1, x, need_w1, need_b1, w1.dtype)
        if need_x:
            if ws is None:
                dx = fused_linear(g1, w1, residual=g2)[0]
            else:
                dx = fused_linear(g1, w1, a2=g2, b2=ws)[0]
    return dx, dw1, db1, dw2, db2, dws


def whole_net_fits(x: Tensor, hidden: int, out_features: int, b_in, blocks, b_out) -> bool:
    """The whole-net kernel takes every padded width within the block kernel's forward limit, and biases."""
    has_biases = b_in is not None and b_out is not None and all(b1 is not None and b2 is not None
                                                                 for _, b1, _, b2 in blocks)
    return has_biases and whole_net.fits(x.shape[1], hidden, out_features, x.element_size())


def whole_net_forward(x: Tensor, w_in: Tensor, b_in: Tensor, blocks, w_out: Tensor, b_out: Tensor) -> Tensor:
    """The whole net in one launch (block parameters stacked per call: a few small copies, no activations)."""
    if blocks:
        w1, b1, w2, b2 = (torch.stack(ts) for ts in zip(*blocks, strict=True))
    else:
        hidden = w_in.shape[0]
        w1 = w2 = x.new_empty((0, hidden, hidden))
        b1 = b2 = x.new_empty((0, hidden))
    return whole_net.forward(x, w_in, b_in, w1, b1, w2, b2, w_out, b_out)
