"""A Triton helper shared by the kernel families: GEMM operands in the dtype the GEMM runs in."""

from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401  (the interpreter needs it visible to every jit function)


@triton.jit
def narrowed(t, like):
    """``t`` in ``like``'s dtype where ``t`` is wider, else ``t`` (decided at compile time).

    Under autocast the activations may be fp32 while the weights are fp16/bf16: the dot runs in the weights' dtype,
    as autocast's own linear does, with the wide tensor read once in its own dtype and rounded on chip.
    """
    if t.dtype.primitive_bitwidth > like.dtype.primitive_bitwidth:
        return t.to(like.dtype)
    else:
        return t
