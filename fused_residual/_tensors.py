"""Shape helpers, and the facts of a tensor that plans key on, shared by the autograd Functions, the custom ops
and the backends' callers."""

from __future__ import annotations

from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """``t`` as 2-D ``(rows, features)`` (a view where the strides allow it)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def with_leading_dims(t: Tensor, like: Tensor, features: int) -> Tensor:
    """``t (M, features)`` viewed with the leading dims of ``like``."""
    return t if like.dim() == 2 else t.view(*like.shape[:-1], features)


def rows_facts(t: Tensor) -> tuple:
    """``(M, facts)`` of an operand whose row count varies: M and everything else a plan depends on."""
    s = t.shape
    n = s[-1]
    m = s[0] if len(s) == 2 else t.numel() // n
    # The row bucket (the dispatch's and autotuners' key) and the class Triton specializes an int on.
    return m, (t.dtype, t.device, n, True if t.is_contiguous() else (t.stride(), s[1:-1]), t.data_ptr() & 15,
               (m - 1).bit_length(), m == 1, m & 15 == 0, m >> 31)


def tensor_facts(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.device, t.shape, t.stride(), t.data_ptr() & 15)
