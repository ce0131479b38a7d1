"""The backend contract and the registry of backends.

A backend computes the block's math on 2-D tensors, the way it is told; it decides nothing about when it runs or
which of its kernel variants runs (``dispatch`` does, from the facts ``unavailable`` and ``takes`` give).
``Backend`` lists what every backend provides. A backend registers by name with ``register``; the name is a
value of ``FUSED_RESIDUAL_BACKEND``, and the parity tests run every registered backend. Adding one is a module
that provides ``Backend`` plus a ``register`` line below (or a call from the user's code).

A backend may also provide plans (the Triton backend does): ``plan_block_forward``, ``plan_block_backward``,
``plan_linear_residual_relu_forward`` and ``plan_linear_residual_relu_backward`` take the arguments of the function
they are named after and return ``(its result, run)``, where ``run`` computes the same for every later call with
operands like these (the same dtypes, device, shapes but the row count, strides, 16-byte alignment, and the row
count's power-of-two bucket and class: 1, a multiple of 16, other), faster than the plain function; ``run`` takes
the tensor arguments only: ``(x, w1, b1, w2, b2, ws)``, ``(dout, x, saved, out, w1, w2, ws, b1, signs)``,
``(h, w, b, residual)`` (returning a 1-tuple), ``(dout, h, out, w)``. Without them, ``plans.py`` calls the plain
function every time.

Shapes, for every function: ``x (M, K)``, ``w1 (H, K)``, ``w2 (N, H)``, ``ws (N, K)`` (projection shortcut) or
None, biases ``(H,)``/``(N,)`` or None; without ``ws``, ``K == N``. All tensors share a device; they share a
dtype too, except that under autocast ``x`` (and ``dout``) may be wider than the weights: the linears run in the
weights' dtype and the shortcut adds the un-rounded ``x`` (see ``activations.Form.output_dtype``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the registry imports nothing of the package at run time (the bottom floor)
    import torch
    from torch import Tensor

    from ..activations import Form

    Needs = tuple[bool, bool, bool, bool, bool, bool]
    Grads = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]



class Backend(Protocol):
    """What a backend module provides (see ``torch_backend`` for the reference implementation)."""

    NAME: str
    VARIANTS: tuple[str, ...]
    """Kernel choices the backend offers, the general one last (``dispatch`` passes one as ``variant``); () if
    none."""

    def unavailable(self, device: torch.device, dtype: torch.dtype, form: Form) -> str | None:
        """None if the backend computes ``form`` for tensors of this device and dtype, else why not."""

    def takes(self, variant: str, x: Tensor, w1: Tensor, ws: Tensor | None, form: Form,
              grad_dtype: torch.dtype | None) -> bool:
        """Whether ``variant`` computes the block's forward for these operands (``grad_dtype`` None), or its backward
        for an output gradient of ``grad_dtype``. The general variant takes every call."""

    def block_forward(self, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                      ws: Tensor | None, form: Form, *, save: bool, variant: str | None = None,
                      signs: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(out, saved)``: ``out (M, N)`` row-major; ``saved`` what backward needs of the hidden layer
        (``act(x W1^T + b1)`` if the activation's derivative reads its output, else ``x W1^T + b1``), or None
        when not ``save``. ``signs`` (a recompute block with a final ReLU, ``save`` False): ``saved`` is instead
        ``out``'s packed sign bits (``signs.py``), written by the computation that writes ``out``."""

    def block_backward(self, dout: Tensor, x: Tensor | None, saved: Tensor | None, out: Tensor | None,
                       w1: Tensor, w2: Tensor, ws: Tensor | None, b1: Tensor | None, signs: Tensor | None,
                       form: Form, needs: Needs, *, dx_dtype: torch.dtype, variant: str | None = None) -> Grads:
        """``(dx, dw1, db1, dw2, db2, dws)``, each only where ``needs`` asks (else None). ``x`` may be None when
        no weight gradient is asked; ``out`` is None when the form has no final activation. A recompute block
        passes ``saved`` None (the hidden layer is computed again from ``x``, ``w1`` and ``b1``: at most one GEMM
        more, none more where one kernel computes the whole backward) and, for its final ReLU, ``signs`` (packed
        bits, ``signs.py``) where ``out`` is None; ``b1`` and ``signs`` are None otherwise."""

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None, activation: str | None = None) -> Tensor:
        """``act(x W^T + b)`` (plain linear for None)."""

    def linear_residual_relu_forward(self, h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
        """``relu(h W^T + b + residual)``, in ``promote(h, residual)``'s dtype."""

    def linear_residual_relu_backward(self, dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor,
                                      needs: tuple[bool, bool, bool, bool], *, dh_dtype: torch.dtype,
                                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dh, dw, db, dresidual)``, each only where ``needs`` asks."""

    def takes_net(self, x: Tensor, w_in: Tensor, b_in: Tensor | None,
                  blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                  b_out: Tensor | None) -> bool:
        """Whether ``net_forward`` computes this net (these shapes, biases, dtype) as one unit."""

    def net_forward(self, x: Tensor, w_in: Tensor, b_in: Tensor | None,
                    blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                    b_out: Tensor | None) -> Tensor:
        """``linear(blocks(relu(linear(x))))`` of reference-form blocks as one unit, without autograd, where
        ``dispatch.net_as_one`` sends it (``takes_net``); elsewhere the caller runs the net layer by layer."""


# name -> (module path, packages it needs to import)
_REGISTRY: dict[str, tuple[str, tuple[str, ...]]] = {}
_LOADED: dict[str, Backend] = {}


def register(name: str, module: str, requires: tuple[str, ...] = ()) -> None:
    """Make ``module`` (a dotted path, imported on first use) the backend called ``name``."""
    _REGISTRY[name] = (module, requires)
    _LOADED.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def missing_requirement(name: str) -> str | None:
    """The first package the backend needs that is not installed, or None (checked without importing it)."""
    for package in _REGISTRY[name][1]:
        if importlib.util.find_spec(package) is None:
            return package
    return None


def get(name: str) -> Backend:
    """The backend module registered as ``name`` (KeyError for an unknown name)."""
    backend = _LOADED.get(name)
    if backend is None:
        backend = _LOADED[name] = importlib.import_module(_REGISTRY[name][0])  # type: ignore[assignment]
    return backend


register("torch", "fused_residual.backends.torch_backend")
register("triton", "fused_residual.backends.triton_backend", requires=("triton",))
