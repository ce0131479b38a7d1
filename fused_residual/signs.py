"""The final ReLU's backward rule as 1 bit per element: what a recompute block keeps instead of its output.

ReLU's backward (aten's rule, ``threshold_backward(g, out, 0)``) passes the gradient where ``out <= 0`` is false
(a NaN passes) and zeroes it elsewhere; that is all a backward needs of ``out`` when nothing else reads it.

Layout, shared with the Triton kernels (which write it in the epilogue that computes ``out`` and read it where the
backward kernels read ``out <= 0``): for ``out (M, N)``, a ``uint8`` tensor ``(M, ceil(N / 8))``, row-major; bit
``j`` (value ``1 << j``) of byte ``k`` of row ``i`` is set when the gradient passes at ``out[i, 8 k + j]``. The pad
bits of a row's last byte are 0. ``M ceil(N / 8)`` bytes: 1/32 of an fp32 ``out``, 1/16 of a 16-bit one.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS: dict[torch.device, Tensor] = {}


def row_bytes(features: int) -> int:
    """Bytes per row of the packed layout."""
    return -(-features // 8)


def _bit_values(device: torch.device) -> Tensor:
    values = _WEIGHTS.get(device)
    if values is None:
        values = _WEIGHTS[device] = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
    return values


def pack(out: Tensor) -> Tensor:
    """The packed bits of ``out (M, N)``: set where ``out <= 0`` is false."""
    m, n = out.shape
    passes = out.le(0).logical_not_()
    pad = row_bytes(n) * 8 - n
    if pad:
        passes = torch.nn.functional.pad(passes, (0, pad))
    weighted = passes.view(m, -1, 8).to(torch.uint8).mul_(_bit_values(out.device))
    return weighted.sum(-1, dtype=torch.uint8)


def unpack(bits: Tensor, features: int) -> Tensor:
    """``(M, features)`` bool: where the gradient passes."""
    m = bits.shape[0]
    return bits.unsqueeze(-1).bitwise_and(_bit_values(bits.device)).ne(0).view(m, -1)[:, :features]


def relu_backward(grad: Tensor, bits: Tensor) -> Tensor:
    """``threshold_backward(grad, out, 0)`` from ``out``'s packed bits: a new tensor."""
    return grad.masked_fill(~unpack(bits, grad.shape[1]), 0)
