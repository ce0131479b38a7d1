"""Functional forms of the fused ops: validated like ``nn.Linear``, under autocast as the reference computes them.

- ``residual_block(x, w1, b1, w2, b2)``: ``relu(relu(x W1^T + b1) W2^T + b2 + x)`` (the whole block), and its other
  forms: ``shortcut_weight`` (a learned projection), ``activation``, ``final_activation=None`` (the transformer
  FFN ``x + linear2(act(linear1(x)))``).
- ``linear_residual_relu(h, w, b, residual)``: ``relu(h W^T + b + residual)`` (the block's second layer).
- ``residual_net_inference(x, w_in, b_in, blocks, w_out, b_out)``: the reference net's math without autograd.

Inputs may have any number of leading dims (1-D included) and any strides. Bad input raises what ``nn.Linear``
raises (``checks.py``): TypeError for a non-tensor, RuntimeError for a wrong last dimension, a dtype or a device
mismatch, each naming what was involved; sparse tensors are refused with a RuntimeError.

Autocast: under ``torch.autocast`` the block computes what the reference block computes under it: the linears run
in the autocast dtype, the shortcut adds ``x`` itself, un-rounded, and the result has the reference's dtype
(``activations.Form.output_dtype``): the reference block adds in place (``out += x``), so its output keeps the autocast
dtype.
"""

from __future__ import annotations

from torch import Tensor

from . import layer_plans, plans, saving
from .activations import REFERENCE_FORM, check_form


def residual_block(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    *,
    shortcut_weight: Tensor | None = None,
    activation: str = "relu",
    final_activation: str | None = "relu",
    recompute: bool = False,
) -> Tensor:
    """``final(act(x @ w1.T + b1) @ w2.T + b2 + s)`` with ``s = x`` or ``s = x @ shortcut_weight.T``.

    Shapes: ``x (..., K)``, ``w1 (H, K)``, ``w2 (N, H)``, ``b1 (H,)``, ``b2 (N,)`` or None,
    ``shortcut_weight (N, K)``; without a shortcut weight ``K`` must equal ``N``. Returns ``(..., N)``.
    ``activation``: ``"relu"`` (the reference block), ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``; ``final_activation``:
    ``"relu"`` (the reference block) or None (the transformer FFN form). ``recompute=True``: keep only ``x`` (and the
    final ReLU's sign bits) for backward, which computes the hidden layer again (see ``FusedResidualBlock``).
    """
    form = REFERENCE_FORM if activation == "relu" and final_activation == "relu" else check_form(activation,
                                                                                          final_activation)
    return plans.run_block(x, w1, b1, w2, b2, shortcut_weight, form,
                           saving.RECOMPUTE if recompute else saving.DEFAULT)


def residual_net_inference(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor,
    b_out: Tensor | None,
) -> Tensor:
    """``linear(blocks(relu(linear(x))))`` of reference-form blocks for inference: no autograd, no autocast (callers
    check both). ``blocks`` holds each block's ``(w1, b1, w2, b2)``. Where the widths allow, the Triton backend
    runs the whole net in one kernel (activations never leave the chip)."""
    return plans.run_net_inference(x, w_in, b_in, blocks, w_out, b_out)


def linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)``: ``h (..., K)``, ``w (N, K)``, ``b (N,)`` or None, ``residual (..., N)``.

    Under autocast the linear runs in the autocast dtype and the sum promotes to the residual's dtype, as
    ``F.linear(h, w, b) + residual`` does there.
    """
    return layer_plans.run_linear_residual_relu(h, w, b, residual)
