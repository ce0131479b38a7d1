"""The ``torch`` backend: the block's forward and backward in plain PyTorch ops.

Same interface and saved tensors as the Triton backend (``fused_residual.triton_backend``). It is written for
few passes over memory, since that is where the time goes on a CPU for these widths:
the bias and the residual are folded into the GEMM's accumulator (``addmm_`` in place on ``x + b``), ReLUs run
in place, and ReLU masks are applied by ``threshold_backward`` (one pass, no boolean temporaries).

All tensors are 2-D here: ``x (M, K)``, ``w1 (N, K)``, ``w2 (N, N)``, ``ws (N, K)`` (projection shortcut, or
None), biases ``(N,)`` or None. ``functional`` validates and flattens before calling in.
"""

from __future__ import annotations

import torch
from torch import Tensor

_relu_backward = torch.ops.aten.threshold_backward


def _mask_inplace(grad: Tensor, activation: Tensor) -> Tensor:
    """``grad * (activation > 0)`` written into ``grad`` (the exact rule autograd uses for ReLU)."""
    return _relu_backward.grad_input(grad, activation, 0, grad_input=grad)


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T + b``."""
    return x.mm(w.t()) if b is None else torch.addmm(b, x, w.t())


def linear_relu(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``relu(x @ w.T + b)``."""
    return linear(x, w, b).relu_()


def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)``: the residual (plus bias) is the GEMM's starting accumulator."""
    out = residual.clone() if b is None else torch.add(residual, b)
    if not out.is_contiguous():  # e.g. a transposed residual: the result must be row-major like F.linear's
        out = out.contiguous()
    return out.addmm_(h, w.t()).relu_()


def linear_residual_relu_backward(
    dout: Tensor, h: Tensor, out: Tensor, w: Tensor, needs: tuple[bool, bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dh, dw, db, dresidual)`` of ``linear_residual_relu``, each only if ``needs`` asks."""
    g = _relu_backward(dout, out, 0)
    dh = g.mm(w) if needs[0] else None
    dw = g.t().mm(h) if needs[1] else None
    db = g.sum(0) if needs[2] else None
    return dh, dw, db, (g if needs[3] else None)


def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
    need_h: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``h = relu(x W1^T + b1)``; ``out = relu(h W2^T + b2 + shortcut)``, shortcut ``x`` or ``x Ws^T``.

    Returns ``(out, h)``. ``need_h=False`` says the caller will not keep ``h`` (inference): a backend may then
    return None for it (this one always has it).
    """
    h = linear_relu(x, w1, b1)
    if ws is None:
        return linear_residual_relu_forward(h, w2, b2, x), h
    # Projection: the shortcut GEMM writes the accumulator that the second GEMM adds into.
    out = x.mm(ws.t()) if b2 is None else torch.addmm(b2, x, ws.t())
    return out.addmm_(h, w2.t()).relu_(), h


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
    """Gradients ``(dx, dw1, db1, dw2, db2, dws)``, each only if ``needs`` (same order) asks.

    ``g2 = dout * (out > 0)``, ``g1 = (g2 W2) * (h > 0)``, ``dx = g1 W1 + (g2 or g2 Ws)``,
    ``dW2 = g2^T h``, ``dW1 = g1^T x``, ``dWs = g2^T x``, ``db = row sums``.
    ``x`` may be None when no weight gradient that needs it is asked for.
    """
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    g2 = _relu_backward(dout, out, 0)
    dw2 = g2.t().mm(h) if need_w2 else None
    db2 = g2.sum(0) if need_b2 else None
    dws = g2.t().mm(x) if need_ws else None
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        g1 = _mask_inplace(g2.mm(w2), h)
        dw1 = g1.t().mm(x) if need_w1 else None
        db1 = g1.sum(0) if need_b1 else None
        if need_x:
            # g2 is ours and no longer needed: the identity shortcut's gradient becomes dx's accumulator.
            dx = g2.addmm_(g1, w1) if ws is None else g1.mm(w1).addmm_(g2, ws)
    return dx, dw1, db1, dw2, db2, dws
