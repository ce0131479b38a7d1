"""Shape helpers shared by the autograd Functions, the custom ops and the backends' callers."""

from __future__ import annotations

from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """``t`` as 2-D ``(rows, features)`` (a view where the strides allow it)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def with_leading_dims(t: Tensor, like: Tensor, features: int) -> Tensor:
    """``t (M, features)`` viewed with the leading dims of ``like``."""
    return t if like.dim() == 2 else t.view(*like.shape[:-1], features)
