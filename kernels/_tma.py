"""The tensor memory accelerator (TMA) path of the fused linear kernel (its "tma" schedules, sm_90).

Host side: ``tma_layout``, whether every operand of a launch's K loop qualifies for TMA copies (16-byte aligned
base, a unit stride, the other stride a multiple of 16 bytes) and in which layout, and the global scratch
allocator that device-side descriptors need. Device side: a descriptor per operand and the K loop whose tiles the
copy engine brings to shared memory (``tma_dot``), the same math as the pointer loop in ``fused_linear_kernel.py``.
Descriptors are made on the device (``tl.make_tensor_descriptor``: triton 3.6 and 3.9 alike), 128 bytes of global
scratch each per program, from ``triton.set_allocator``; they zero-fill past the bounds. An operand stored
column-contiguous (A = g^T, B = W^T) is described as its transpose and its tile transposed on chip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import _common
from ._cast import narrowed
from .activations import apply


def _tma_dim(t: torch.Tensor, dims: str) -> str:
    """Which dim of the 2-D ``t`` (named by ``dims``) the copy engine can walk as its contiguous one: stride 1, the
    other stride a multiple of 16 bytes, the base 16-byte aligned; "" if none. (Per call on sm_90: kept lean.)"""
    s0, s1 = t.stride()
    if t.data_ptr() & 15:
        return ""
    if s1 == 1:
        return dims[1] if not s0 * t.element_size() & 15 else ""
    if s0 == 1:
        return dims[0] if not s1 * t.element_size() & 15 else ""
    return ""


def tma_layout(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor | None = None, sb: torch.Tensor | None = None,
               q: torch.Tensor | None = None) -> str:
    """The kernel's TMA_LAYOUT: A's contiguous dim ("k": row-major, "m": A = g^T) then B's ("n": row-major, "k":
    B = W^T) where every operand the K loop reads (A, B, the mask Q on A, the second pair) meets TMA's rules,
    Q and SA laid out as A and SB as B; else "" (no TMA config may run)."""
    a_dim, b_dim = _tma_dim(a, "mk"), _tma_dim(b, "kn")
    if not a_dim or not b_dim:
        return ""
    if (q is not None and _tma_dim(q, "mk") != a_dim) or (sa is not None and (
            _tma_dim(sa, "mk") != a_dim or _tma_dim(sb, "kn") != b_dim)):
        return ""
    return a_dim + b_dim


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the device-side TMA descriptors (128 bytes each per program), on the current device."""
    return torch.empty(size, dtype=torch.int8, device=_common.current_gpu())


def ensure_scratch_allocator() -> None:
    """Device-side descriptors need ``triton.set_allocator``; ours is set unless the caller has set their own.
    (triton 3.6 and 3.9 keep it in the same ContextVar, per thread; its default raises at launch.)"""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@triton.jit
def descriptor(ptr, rows, cols, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """A TMA descriptor for BLOCK_R x BLOCK_C tiles of the (rows, cols) operand at ``ptr``. TRANSPOSED: the operand
    is stored column-contiguous (stride_r == 1), so the descriptor walks its transpose (the copy engine needs the
    last stride to be 1) and ``tma_tile`` transposes each tile back on chip."""
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, [cols, rows], [stride_c, stride_r], [BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(ptr, [rows, cols], [stride_r, stride_c], [BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def tma_tile(desc, r, c, TRANSPOSED: tl.constexpr):
    """The tile at (r, c) of the operand ``desc`` describes (``descriptor``); out of bounds reads as 0."""
    if TRANSPOSED:
        tile = desc.load([c, r]).T
    else:
        tile = desc.load([r, c])
    return tile


@triton.jit
def tma_dot(acc, rowsum, a_desc, b_desc, q_desc, row, col, k_start, steps,
            A_T: tl.constexpr, B_T: tl.constexpr, MASK_A: tl.constexpr, B_ACTIVATION: tl.constexpr,
            HAS_ROWSUM: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
            WARP_SPECIALIZE: tl.constexpr):
    """``acc += A'[row tile, k_start:] @ B'[k_start:, col tile]`` over ``steps`` BLOCK_K steps, the tiles copied to
    shared memory by the copy engine (TMA); A' and B' as in ``fused_linear_kernel.py``. No masks: the descriptors know
    the bounds and fill zeros past them."""
    for i in tl.range(0, steps, warp_specialize=WARP_SPECIALIZE):
        k = k_start + i * BLOCK_K
        a = tma_tile(a_desc, row, k, A_T)
        b = tma_tile(b_desc, k, col, B_T)
        if MASK_A:  # A = dY * (Y > 0), aten's rule (as in the pointer loop)
            a = tl.where(tma_tile(q_desc, row, k, A_T) <= 0, 0.0, a)
        if B_ACTIVATION != "identity":
            b = apply(b.to(tl.float32), B_ACTIVATION).to(b.dtype)
        a = narrowed(a, b)
        b = narrowed(b, a)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
    return acc, rowsum

