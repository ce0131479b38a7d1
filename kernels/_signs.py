"""The final ReLU's backward rule as packed bits, inside the kernels: written by the epilogue that computes ``out``,
read where a backward kernel would read ``out <= 0``.

Layout (the same as ``fused_residual/signs.py``, which the torch backend uses): for ``out (M, N)``, ``uint8 (M,
ceil(N / 8))`` with a row stride of its own; bit ``j`` of byte ``k`` of row ``i`` is set when the gradient passes
at ``out[i, 8 k + j]``, i.e. where ``out <= 0`` is false (aten's ``threshold_backward`` rule: a NaN passes). Pad bits
are 0. A tile whose first column is a multiple of 8 owns whole bytes: no two programs write one byte.

Bytes: ``M N / 8`` written instead of ``M N`` elements of ``out`` kept (1/32 of fp32, 1/16 of 16-bit); a read of
the bits in backward moves ``M N / 8`` bytes (each byte is loaded by the 8 lanes that need one of its bits, from
the same cache line).
"""

from __future__ import annotations

import triton
import triton.language as tl


def row_bytes(features: int) -> int:
    """Bytes per row of the packed bits."""
    return -(-features // 8)


@triton.jit
def store_signs(bits_ptr, acc, row0, col0, tile_m, mask_m, N, stride_bits, WIDTH: tl.constexpr):
    """Pack the signs of the ``(rows, WIDTH)`` tile ``acc`` (rows ``row0 + tile_m``, columns ``col0 ...``, ``col0``
    a multiple of 8) and store them: ``WIDTH / 8`` bytes per row."""
    tl.static_assert(WIDTH % 8 == 0, "a tile of packed signs owns whole bytes")
    cols = tl.arange(0, WIDTH)
    packed = tl.where((cols < N - col0)[None, :] & ~(acc <= 0), 1, 0)
    # Neighbouring columns joined three times (pairs, fours, bytes): splits of a trailing dim of 2, which stay in
    # each thread's registers, rather than an 8-wide reduction that reshapes the tile through shared memory.
    packed = _join_pairs(packed, 1)
    packed = _join_pairs(packed, 2)
    packed = _join_pairs(packed, 4)
    byte_cols = tl.arange(0, WIDTH // 8)
    ptrs = bits_ptr + row0 * stride_bits + col0 // 8 + (tile_m[:, None] * stride_bits + byte_cols[None, :])
    tl.store(ptrs, packed.to(tl.uint8), mask=mask_m[:, None] & (byte_cols < (N - col0 + 7) // 8)[None, :])


@triton.jit
def _join_pairs(bits, SHIFT: tl.constexpr):
    """``(rows, 2 n)`` -> ``(rows, n)``: column ``2 i`` ORed with column ``2 i + 1`` shifted by SHIFT."""
    even, odd = tl.split(tl.reshape(bits, (bits.shape[0], bits.shape[1] // 2, 2)))
    return even | (odd << SHIFT)


@triton.jit
def sign_passes(bits_ptr, rows, feats, stride_bits, mask):
    """Where the gradient passes, for the elements ``(rows, feats)`` (index tensors of one shape, broadcast: a tile
    with rows on either axis) of ``out``, from its packed bits; False where ``mask`` is."""
    byte = tl.load(bits_ptr + rows * stride_bits + (feats >> 3), mask=mask, other=0).to(tl.int32)
    return ((byte >> (feats & 7)) & 1) != 0
