"""The activations of ``fused_residual.activations`` as Triton functions: one for each activation, one for each
derivative, and the two switches the kernels call with the activation's name as a constexpr.

Adding an activation: its function and its derivative here plus a branch in ``apply`` and ``gradient`` (the one
place that maps names to Triton functions), and its entry in ``fused_residual/activations.py`` (torch function,
derivative, ``from_output``, ``piecewise_linear``, ``register_class``); what the kernels store and read, the tiles
they may take and the tests follow the entry. ``"identity"`` (the registry's ``IDENTITY``) is the kernels' name
for no activation (a plain linear).

Every function computes in fp32 (callers pass fp32 accumulators; the derivatives take the saved tensor as
loaded). The formulas are PyTorch's (``aten`` ``gelu``, ``gelu_backward``, ``silu_backward``), their constants
written out as literals (1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327, sqrt(2/pi) =
0.7978845608028654): a module global read by a kernel would be re-checked by Triton at every launch.

    relu       max(x, 0)                        derivative from the output:  grad where out > 0, else 0
    gelu       x Phi(x) = x/2 (1 + erf(x/sqrt2))   grad (Phi(x) + x phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)
    gelu_tanh  x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
               derivative  (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u)
    silu       x sigmoid(x)                     grad s (1 + x (1 - s)),  s = sigmoid(x)

ReLU's forward keeps NaN (``torch.relu``'s rule) and its derivative is ``aten.threshold_backward``'s: 0 where the
output is <= 0, the incoming gradient elsewhere (a NaN output passes it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(x):
    return tl.where(x < 0, 0.0, x)


@triton.jit
def relu_gradient(grad, out):
    """From the activation's output, as ``aten.threshold_backward(grad, out, 0)``."""
    return tl.where(out <= 0, 0.0, grad)


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def gelu_gradient(grad, x):
    x = x.to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return grad * (cdf + x * pdf)


@triton.jit
def _tanh(u):
    # From exp(-2|u|) in (0, 1]: no overflow for any u (NaN stays NaN).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def gelu_tanh(x):
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + t)


@triton.jit
def gelu_tanh_gradient(grad, x):
    x = x.to(tl.float32)
    x_sq = x * x
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x_sq * x))
    inner_derivative = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x_sq)
    return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner_derivative)


@triton.jit
def silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def silu_gradient(grad, x):
    x = x.to(tl.float32)
    s = tl.sigmoid(x)
    return grad * s * (1.0 + x * (1.0 - s))


@triton.jit
def apply(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION(x)`` for fp32 ``x``; ``IDENTITY`` returns ``x``."""
    if ACTIVATION == "relu":
        return relu(x)
    elif ACTIVATION == "gelu":
        return gelu(x)
    elif ACTIVATION == "gelu_tanh":
        return gelu_tanh(x)
    elif ACTIVATION == "silu":
        return silu(x)
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown activation")
        return x


@triton.jit
def gradient(grad, saved, ACTIVATION: tl.constexpr):
    """The gradient of the activation's input from ``grad`` (fp32) and ``saved`` (any float dtype; computed on in
    fp32, except ReLU's comparison, exact in any dtype and cheaper in registers in the stored one): the activation's
    output where the registry's ``from_output`` says so (ReLU), else its input (the pre-activation)."""
    if ACTIVATION == "relu":
        return relu_gradient(grad, saved)
    elif ACTIVATION == "gelu":
        return gelu_gradient(grad, saved)
    elif ACTIVATION == "gelu_tanh":
        return gelu_tanh_gradient(grad, saved)
    elif ACTIVATION == "silu":
        return silu_gradient(grad, saved)
    else:
        tl.static_assert(ACTIVATION == "identity", "unknown activation")
        return grad


# The saved tensor of the hidden activation, as the registry's ``from_output`` says (the constexpr FROM_OUTPUT):
# the activation's output where its derivative reads that (ReLU: the mask, and it is dW2's operand as it is), else
# its input.


@triton.jit
def saved_of(pre, h, FROM_OUTPUT: tl.constexpr):
    """What backward keeps of the hidden activation: ``h = act(pre)`` with FROM_OUTPUT, else ``pre``."""
    if FROM_OUTPUT:
        return h
    else:
        return pre


@triton.jit
def output_from_saved(saved, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """``act(pre)`` from what ``saved_of`` kept: itself with FROM_OUTPUT, else recomputed in fp32, rounded back."""
    if FROM_OUTPUT:
        return saved
    else:
        return apply(saved.to(tl.float32), ACTIVATION).to(saved.dtype)
