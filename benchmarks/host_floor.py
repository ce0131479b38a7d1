"""The floor of any fused block built on a Python ``torch.autograd.Function``, for the host-time benchmark (its
``floor`` route): ``FloorBlock`` has the reference block's parameters and calls a Function that does only what
such a design must do per call, each the cheapest way this file knows, and nothing else: no key, no plan, no
launch.

- forward: the Function's C ``apply`` (as the package's plans call it) with the block's five operands, two new
  ``(M, F)`` tensors (the output and the hidden layer the backward reads), ``save_for_backward`` of ``x``, the
  hidden layer, the output and both weights;
- backward: the saved tensors unpacked, five new gradients (``dx``, ``dW1``, ``db1``, ``dW2``, ``db2``).

New tensors are ``new_empty(*sizes)`` (the cheapest allocation from Python). A training step then costs the
module call, ``sum()``, ``backward()`` with the engine's walk over one Python node and the gradients' accumulation,
and these: a fused block whose own code cost nothing would cost as much. It computes nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # type: ignore[override]
        out, hidden = x.new_empty(*x.shape), x.new_empty(*x.shape)
        ctx.save_for_backward(x, hidden, out, w1, w2)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        x, _, _, w1, w2 = ctx.saved_tensors
        return (x.new_empty(*x.shape), w1.new_empty(*w1.shape), w1.new_empty(w1.shape[0]), w2.new_empty(*w2.shape),
                w2.new_empty(w2.shape[0]))


_apply = super(torch.autograd.Function, _FloorFunction).apply  # the C apply, as fused_residual/plans.py takes it


class FloorBlock(nn.Module):
    """The reference block's ``linear1`` and ``linear2``; ``forward`` calls the floor Function (module docstring)."""

    def __init__(self, width: int, device=None, dtype=None) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, width, device=device, dtype=dtype)
        self.linear2 = nn.Linear(width, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules
        p1, p2 = modules["linear1"]._parameters, modules["linear2"]._parameters
        return _apply(x, p1["weight"], p1["bias"], p2["weight"], p2["bias"])
