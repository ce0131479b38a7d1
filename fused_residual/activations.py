"""The activations a fused block can apply, and the block's form (which activation where).

One ``Activation`` entry per activation: its torch function, its derivative, and the facts the kernels, the
backends, the kernels' config pruning and the tests read (``from_output``, ``piecewise_linear``,
``register_class``); nothing else decides by an activation's name. The Triton kernels have the same activation, by
the same name, in ``kernels/activations.py``; the tests iterate over ``ACTIVATIONS``. Adding one is an entry here
and a function and its derivative there (plus a branch in its two switches).

The derivative reads what the backward keeps: the activation's output where that suffices (ReLU: the mask is
``h > 0``, and ``h`` is needed anyway for ``dW2 = g2^T h``), else its input, the pre-activation (``h`` is then
recomputed from it where needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten
REGISTER_CLASSES = ("light", "heavy")


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[Tensor], Tensor]
    """Out of place, as the user's module computes it."""
    forward_: Callable[[Tensor], Tensor]
    """In place on a temporary the caller owns (the same values as ``forward``)."""
    backward: Callable[[Tensor, Tensor], Tensor]
    """``(grad of the output, saved) -> grad of the input``; ``saved`` is the output if ``from_output``, else the
    input."""
    from_output: bool
    """The backward keeps the activation's output (else its input, the pre-activation) and the derivative reads
    it; the kernels take it as the constexpr FROM_OUTPUT where they decide what to store and read."""
    piecewise_linear: bool
    """Its derivative is constant almost everywhere: a double backward needs no second derivative."""
    register_class: str
    """What computing it costs a kernel in registers beside a GEMM's tiles (``REGISTER_CLASSES``): "light" (a
    compare and a select or a few multiplies, like ReLU) takes every tile the kernels offer and the whole-block
    kernels; "heavy" (transcendental math: erf, tanh, exp) takes only the smaller tiles the kernels' configs list
    for it and the two-GEMM kernels. The ahead-of-time compiles check every activation in its class."""

    def __post_init__(self) -> None:
        if self.register_class not in REGISTER_CLASSES:
            raise ValueError(f"register_class={self.register_class!r} is not one of {REGISTER_CLASSES}")


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", torch.relu, torch.relu_, lambda g, out: _aten.threshold_backward(g, out, 0),
                   from_output=True, piecewise_linear=True, register_class="light"),
        Activation("gelu", F.gelu, lambda t: t.copy_(F.gelu(t)), lambda g, pre: _aten.gelu_backward(g, pre),
                   from_output=False, piecewise_linear=False, register_class="heavy"),
        Activation("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"),
                   lambda t: t.copy_(F.gelu(t, approximate="tanh")),
                   lambda g, pre: _aten.gelu_backward(g, pre, approximate="tanh"),
                   from_output=False, piecewise_linear=False, register_class="heavy"),
        Activation("silu", F.silu, lambda t: F.silu(t, inplace=True), lambda g, pre: _aten.silu_backward(g, pre),
                   from_output=False, piecewise_linear=False, register_class="heavy"),
    )
}
NAMES = tuple(ACTIVATIONS)
IDENTITY = "identity"
"""The kernels' name for no activation (a plain linear); never a registry entry."""
FINAL_ACTIVATIONS = ("relu", None)


class Form(NamedTuple):
    """What the block computes around its two linears:
    ``out = final_activation(linear2(activation(linear1(x))) + shortcut(x))``.

    ``Form("relu", "relu")`` is the reference residual block; ``Form("gelu", None)`` the transformer FFN
    ``x + linear2(gelu(linear1(x)))``.
    """

    activation: str = "relu"
    final_activation: str | None = "relu"

    @property
    def hidden(self) -> Activation:
        return ACTIVATIONS[self.activation]

    def output_dtype(self, x_dtype: torch.dtype, compute_dtype: torch.dtype, projection: bool) -> torch.dtype:
        """The block's output dtype when ``x`` is wider than the dtype its linears run in (autocast).

        The reference block adds the shortcut in place (``out += x``), so its output keeps the linears' dtype; the
        FFN form is written out of place (``x + ffn(x)``), which promotes; a projection shortcut is a linear.
        """
        if projection or self.final_activation is not None:
            return compute_dtype
        return torch.promote_types(x_dtype, compute_dtype)


REFERENCE_FORM = Form()


def check_form(activation: object, final_activation: object) -> Form:
    """``Form(activation, final_activation)``, or ValueError naming the choices."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {', '.join(map(repr, NAMES))}")
    if final_activation not in FINAL_ACTIVATIONS:
        raise ValueError(f"final_activation={final_activation!r} must be 'relu' (the reference block) or None "
                         "(the transformer FFN form x + linear2(act(linear1(x))))")
    return Form(activation, final_activation)  # type: ignore[arg-type]
