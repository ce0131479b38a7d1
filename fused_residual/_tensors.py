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


def _tensor_guards():
    """PyTorch's C++ check of tensors' dtype, device, requires_grad, dispatch keys, sizes and strides against those
    they had (``torch._C._dynamo.guards.TensorGuards``, which ``torch.compile``'s guards were built on): a tenth of
    reading those facts in Python. None where this torch lacks it or it fails a check of what it must tell apart."""
    try:
        import torch
        from torch._C._dynamo.guards import TensorGuards

        a, w = torch.ones(4, 2), torch.ones(2, 2, requires_grad=True)
        guard = TensorGuards(a, w, dynamic_dims_sizes=[[None, 2], [2, 2]], dynamic_dims_strides=[[2, 1], [2, 1]])
        same = guard.check(torch.ones(8, 2), w)  # another row count: the one dynamic size
        told_apart = ((torch.ones(4, 2, dtype=torch.float64), w), (torch.ones(4, 3), w), (torch.ones(2, 4).t(), w),
                      (torch.ones(4, 2, requires_grad=True), w), (a, w.detach()), (torch.ones(4, 2, 1), w),
                      (a, torch.ones(2, 2).t()))
        if same and not any(guard.check(*pair) for pair in told_apart):
            return TensorGuards
    except Exception:  # noqa: S110 - an older or newer torch: the plans' key alone
        pass
    return None


TensorGuards = _tensor_guards()


def signature_guard(x: Tensor, *tensors: Tensor) -> object | None:
    """A check that ``x`` (any row count) and ``tensors`` have the dtypes, devices, requires_grad, dispatch keys,
    sizes and strides these have: ``guard.check(x, *tensors)``; None where TensorGuards is unavailable."""
    if TensorGuards is None:
        return None
    every = (x, *tensors)
    try:
        return TensorGuards(*every, dynamic_dims_sizes=[[None, *x.shape[1:]], *(list(t.shape) for t in tensors)],
                            dynamic_dims_strides=[list(t.stride()) for t in every])
    except Exception:  # a tensor it cannot describe: the plans' key alone
        return None
