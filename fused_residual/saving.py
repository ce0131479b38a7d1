"""What a block keeps for its backward: the save policy, in one place.

The block's Function saves, through ``ctx.save_for_backward`` only (so saved-tensor hooks such as ``save_on_cpu``
see all of it), a subset of ``KEPT = (x, hidden, out, signs, w1, b1, w2, ws)``, each slot None where not kept:

- default mode, never more than eager PyTorch keeps for the same math: ``hidden`` (the activation's output where
  its derivative reads that, ReLU; else its input, the pre-activation) where ``g1`` or ``dW2`` needs it; ``out`` for
  the final ReLU's mask (eager keeps it too, and in a chain it is the next layer's kept input: the same storage);
  ``x`` only for ``dW1`` / ``dWs``; the weights (parameters: no memory of their own; the backward reads their dtypes
  and shapes); the biases never, but ``b1`` where ``x`` and ``hidden`` are both kept (a parameter: no memory of its
  own). A double backward differentiates through ``hidden``: where ``x`` is not kept, the Function returns it as a
  second output (``returns_hidden``; see ``composite.block_grads``), so it needs neither the biases nor ``x``; where
  ``x`` is kept, it computes ``hidden`` again from ``x``, ``w1`` and ``b1`` (one GEMM in a double backward alone),
  and the Function has one output (a second output costs every training call about a microsecond).
- ``recompute``: ``x``, ``w1`` and ``b1`` (``hidden`` is computed again in backward: one GEMM) and, for a final
  ReLU, its packed sign bits (``signs.py``, 1 bit per element), or ``out`` itself where the caller keeps ``out``
  anyway (``RECOMPUTE_OUT_KEPT``: inside a net, a block's output is the next layer's kept input).

Nothing is kept when no input needs a gradient. Under autocast the weights kept are their rounded copies, and
``x`` is kept in its own dtype (the kernels round it on chip: no rounded copy is made), where eager keeps rounded
copies of what its linears need.
"""

from __future__ import annotations

from .activations import Form

KEPT = ("x", "hidden", "out", "signs", "w1", "b1", "w2", "ws")
NOTHING = (False,) * len(KEPT)
X, HIDDEN, SIGNS = KEPT.index("x"), KEPT.index("hidden"), KEPT.index("signs")
# A block's saving mode: the default, recompute (sign bits), recompute beside a caller that keeps ``out``.
DEFAULT, RECOMPUTE, RECOMPUTE_OUT_KEPT = 0, 1, 2


def block_keeps(form: Form, needs: tuple[bool, ...], mode: int = DEFAULT) -> tuple[bool, ...]:
    """Which of ``KEPT`` the block keeps in ``mode``, given ``needs`` (``needs_input_grad`` of ``x, w1, b1, w2,
    b2, ws``)."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs[:6]
    if not (need_x or need_w1 or need_b1 or need_w2 or need_b2 or need_ws):
        return NOTHING
    g1 = need_x or need_w1 or need_b1  # g1 = (g2 W2) * act'(hidden), for dx, dW1 and db1
    hidden = g1 or need_w2  # and dW2 = g2^T act(hidden)
    final = form.final_activation is not None
    # The weights always (plans.py relies on it): parameters cost nothing kept, and the backward reads their
    # dtypes and shapes.
    if mode != DEFAULT:
        out_kept = mode == RECOMPUTE_OUT_KEPT
        return (hidden or need_ws, False, final and out_kept, final and not out_kept, True, hidden, True, True)
    keep_x = need_w1 or need_ws
    return (keep_x, hidden, final, False, True, hidden and keep_x, True, True)


def returns_hidden(keep: tuple[bool, ...]) -> bool:
    """Whether the block's Function returns its kept hidden layer as a second output (for a double backward to
    differentiate through): where it keeps ``hidden`` and not ``x`` (with ``x``, the hidden layer is computed again)."""
    return keep[HIDDEN] and not keep[X]
