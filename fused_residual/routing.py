"""Every "which path" decision, in one place.

A call of the block goes one of these ways, decided here and nowhere else:

1. ``torch.compile`` tracing: the custom ops of ``ops.py`` (opaque to the compiler); ``torch.export`` tracing: the
   plain composite, an aten-only graph for ONNX, AOTInductor and other runtimes (see ``ops.py``).
2. ``torch.func`` transforms active: the plain composite (``composite.py``), differentiable ops that the transforms
   see through. A backward that builds a graph (``create_graph=True``) is handled by the Function itself
   (``autograd.py``), which then differentiates through the same composite.
3. Otherwise a ``Route``: a backend (and the kernel variant it should use) under the block's one
   ``autograd.Function`` when a gradient is needed or called directly when not; or ``COMPOSITE``, the plain
   composite under PyTorch's own autograd, where that is cheaper than a Function.

Which route: ``FUSED_RESIDUAL_BACKEND`` (read at every call, so tests and users can switch at run time):

- ``auto`` (default): the measured winner for the call's (device, dtype, width, row bucket, forward/training) in
  the dispatch tables (``dispatch.py``), else its conservative rule: on CUDA the Triton kernels only where a
  measurement found them faster, the cuBLAS composite elsewhere; on the CPU the ``torch`` backend or the plain
  composite.
- the name of a registered backend (``torch``, ``triton``), optionally with one of its kernel variants
  (``triton:two_gemm``): always that backend. A forced backend that cannot run the call raises RuntimeError saying
  why, never a silent fallback. The Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``.
- ``composite``: always the plain composite (the reference's own ops under PyTorch's autograd).

Modules: a fused module runs its own submodules (``nn.Linear`` calls, with their hooks) instead of the kernels
unless each is exactly what the kernels compute (``plain_linear``); ``FusedResidualNet`` runs as one unit only
when ``net_parameters`` finds every part plain.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import backends, composite, dispatch
from ._tensors import rows, with_leading_dims
from .activations import SEED_FORM, Form
from .autograd import LinearResidualReluFunction, ResidualBlockFunction
from .backends import Backend

ENV_VAR = "FUSED_RESIDUAL_BACKEND"
AUTO = "auto"
_Linear = nn.Linear


class Route(NamedTuple):
    """A backend and the kernel variant it should use; ``backend`` None is the plain composite."""

    backend: Backend | None
    variant: str | None = None

    @property
    def name(self) -> str:
        if self.backend is None:
            return "composite"
        return self.backend.NAME if self.variant is None else f"{self.backend.NAME}:{self.variant}"


COMPOSITE = Route(None)
COMPOSITE_CHOICE = "composite"

_parsed: tuple[str | None, str] = (None, AUTO)  # (raw value, choice): parse only when the variable changes


def requested() -> str:
    """The choice ``FUSED_RESIDUAL_BACKEND`` asks for: ``auto``, a registered backend's name, or ``name:variant``
    (e.g. ``triton:two_gemm``) to force one of its kernel variants. Validated."""
    global _parsed
    raw, parsed = os.environ.get(ENV_VAR), _parsed  # one read of the pair: another thread may replace it
    if raw == parsed[0]:
        return parsed[1]
    choice = (raw or AUTO).strip().lower() or AUTO
    if choice not in (AUTO, COMPOSITE_CHOICE) and choice.partition(":")[0] not in backends.names():
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join((AUTO, COMPOSITE_CHOICE, *backends.names()))}"
                         " (a backend optionally as name:variant)")
    _parsed = (raw, choice)
    return choice


def forced(choice: str, device: torch.device, dtype: torch.dtype, form: Form) -> Route:
    """The route of a forced ``name[:variant]``, or RuntimeError (ValueError for an unknown variant) saying why
    it cannot run this call."""
    name, _, variant = choice.partition(":")
    missing = backends.missing_requirement(name)
    why = f"the {missing} package is not installed (pip install {missing})" if missing else None
    backend = None
    if why is None:
        backend = backends.get(name)
        if variant and variant not in backend.VARIANTS:
            raise ValueError(f"{ENV_VAR}={choice}: the {name} backend has no variant {variant!r} "
                             f"(it has: {', '.join(backend.VARIANTS) or 'none'})")
        why = backend.unavailable(device, dtype, form)
    if why is not None:
        raise RuntimeError(f"{ENV_VAR}={name} was forced but the {name} backend cannot run this call: {why}")
    return Route(backend, variant or None)


_routes: dict[tuple, Route] = {}


def route(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool) -> Route:
    """The route for a block call on ``x (..., K)`` with ``w1 (H, K)``; decisions are cached per call signature
    (what varies per call is only the batch size, bucketed)."""
    choice = requested()
    width = x.shape[-1]
    rows_ = x.numel() // width if width else 0
    key = (choice, x.device, x.dtype, w1.dtype, (rows_ - 1).bit_length(), width, w1.shape[0], ws is None, form,
           training)  # (rows - 1).bit_length(): the row bucket's exponent (dispatch.bucket)
    chosen = _routes.get(key)
    if chosen is None:
        if choice == AUTO:
            chosen = _auto(x, w1, ws, form, training, rows_)
        elif choice == COMPOSITE_CHOICE:
            chosen = COMPOSITE
        else:
            chosen = forced(choice, x.device, w1.dtype, form)
        _routes[key] = chosen
    return chosen


def _auto(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool, rows_: int) -> Route:
    """``auto``: the dispatch tables' winner for a seed-form call (``dispatch.winner``), among the candidates
    that can run it; the conservative rule for other forms and where the Triton kernels cannot run."""
    dtype, device = w1.dtype, x.device
    triton_backend = None
    if device.type == "cuda" and backends.missing_requirement("triton") is None:
        triton_backend = backends.get("triton")
        if triton_backend.unavailable(device, dtype, form) is not None:
            triton_backend = None
    if form == SEED_FORM:
        winner = dispatch.winner(device, dtype, x.shape[-1], w1.shape[0], rows_, ws is not None, training)
    else:  # no form but the seed's was measured: the rule's non-Triton choice (projection=True never takes Triton)
        winner = dispatch.conservative(device.type, dtype, x.shape[-1], w1.shape[0], rows_, True, training)
    if winner.startswith("triton"):
        if triton_backend is not None:
            return Route(triton_backend, winner.partition(":")[2] or None)
        winner = dispatch.conservative("cuda", dtype, 0, 0, 0, True, training)
    return COMPOSITE if winner == "composite" else Route(backends.get("torch"))


def reset() -> None:
    """Forget cached decisions (after a dispatch table or backend registration changes)."""
    global _parsed
    _routes.clear()
    _parsed = (None, AUTO)
    dispatch.reset()


# ---- calls ------------------------------------------------------------------------------------------------

_functorch_active = torch._C._are_functorch_transforms_active  # torch.func transforms on: a C call


def needs_autograd(*tensors: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def residual_block(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None,
                   form: Form, recompute: bool = False, out_kept: bool = False) -> Tensor:
    """The block on validated operands (``x`` of any leading dims; under autocast the weights already cast)."""
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():  # an aten-only graph that deploys anywhere (ops.py: "Export")
            return composite.residual_block(x, w1, b1, w2, b2, ws, form)
        from . import ops

        return ops.residual_block(x, w1, b1, w2, b2, ws, form, recompute, out_kept)
    if _functorch_active():
        return composite.residual_block(x, w1, b1, w2, b2, ws, form)
    training = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad or (
        b1 is not None and b1.requires_grad) or (b2 is not None and b2.requires_grad) or (
        ws is not None and ws.requires_grad))
    chosen = route(x, w1, ws, form, training)
    if chosen.backend is None:
        if not (training and recompute):
            return composite.residual_block(x, w1, b1, w2, b2, ws, form)
        chosen = Route(backends.get("torch"))  # the composite keeps what eager keeps: recompute needs a Function
    if training:
        return ResidualBlockFunction.apply(x, w1, b1, w2, b2, ws, form, chosen, recompute, out_kept)[0]
    out, _ = chosen.backend.block_forward(rows(x), w1, b1, w2, b2, ws, form, save=False, variant=chosen.variant)
    return with_leading_dims(out, x, w2.shape[0])


def linear_residual_relu(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h W^T + b + residual)`` on validated operands."""
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():
            return composite.linear_residual_relu(h, w, b, residual)
        from . import ops

        return ops.linear_residual_relu(h, w, b, residual)
    if _functorch_active():
        return composite.linear_residual_relu(h, w, b, residual)
    training = needs_autograd(h, w, b, residual)
    chosen = route(h, w, None, SEED_FORM, training)
    if chosen.backend is None:
        return composite.linear_residual_relu(h, w, b, residual)
    if training:
        return LinearResidualReluFunction.apply(h, w, b, residual, chosen)
    out = chosen.backend.linear_residual_relu_forward(rows(h), w, b, rows(residual))
    return with_leading_dims(out, h, w.shape[0])


def residual_net(x: Tensor, w_in: Tensor, b_in: Tensor | None,
                 blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]], w_out: Tensor,
                 b_out: Tensor | None) -> Tensor:
    """The net without autograd. A forced backend runs it as one unit where it has one (the Triton whole-net
    kernel), else layer by layer; ``auto`` routes each block like a block call (the whole-net kernel has no
    measured win yet, see ``dispatch``)."""
    choice = requested()
    x2d = rows(x)
    if choice in (AUTO, COMPOSITE_CHOICE):
        a = torch.relu_(F.linear(x2d, w_in, b_in))
        for w1, b1, w2, b2 in blocks:
            a = residual_block(a, w1, b1, w2, b2, None, SEED_FORM)
        y = F.linear(a, w_out, b_out)
    else:
        chosen = forced(choice, x.device, x.dtype, SEED_FORM)
        backend = chosen.backend
        y = None if chosen.variant else backend.net_forward(x2d, w_in, b_in, blocks, w_out, b_out)
        if y is None:
            a = backend.linear(x2d, w_in, b_in, "relu")
            for w1, b1, w2, b2 in blocks:
                a, _ = backend.block_forward(a, w1, b1, w2, b2, None, SEED_FORM, save=False,
                                             variant=chosen.variant)
            y = backend.linear(a, w_out, b_out)
    return with_leading_dims(y, x, w_out.shape[0])


# ---- modules ----------------------------------------------------------------------------------------------

def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether module hooks registered for every module (``nn.modules.module.register_module_*_hook``) exist:
    they must see each ``nn.Linear`` call."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def plain_linear(m: object) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` if calling ``m`` computes exactly ``F.linear(x, weight, bias)``: an ``nn.Linear`` (or a
    subclass that keeps its ``forward``, e.g. a parametrized one) without hooks of its own. Else None."""
    if type(m) is nn.Linear:
        if _has_hooks(m):
            return None
        params = m._parameters
        if "weight" in params:  # the common case, without nn.Module.__getattr__'s cost
            return params["weight"], params.get("bias")
        return m.weight, m.bias
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and not _has_hooks(m):
        return m.weight, m.bias
    return None


def why_not_plain(name: str, m: object) -> str | None:
    """Why ``m`` (a linear named ``name``) is not what the kernels compute, or None if it is."""
    if not isinstance(m, nn.Linear):
        return f"{name} is a {type(m).__name__}, not an nn.Linear"
    if type(m).forward is not nn.Linear.forward:
        return f"{name} is a {type(m).__name__} with its own forward"
    if _has_hooks(m):
        return f"{name} has forward or backward hooks (weight_norm/spectral_norm register one)"
    return None


def net_parameters(net: nn.Module, x: object):
    """``(w_in, b_in, [(w1, b1, w2, b2), ...], w_out, b_out)`` when ``net`` may run as one unit, else None: no
    autograd, no autocast, not compiling, no hooks, every part exactly a plain linear or seed-form block."""
    from .modules import FusedResidualBlock

    if not isinstance(x, Tensor) or torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled():
        return None
    if _functorch_active() or _has_hooks(net) or global_hooks():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in net.parameters())):
        return None
    modules = net._modules
    first, last = plain_linear(modules.get("linear1")), plain_linear(modules.get("linear2"))
    blocks = modules.get("blocks")
    if first is None or last is None or type(blocks) is not nn.ModuleList or _has_hooks(blocks):
        return None
    params = []
    for block in blocks:
        if (type(block) is not FusedResidualBlock or block.activation != "relu"
                or block.final_activation != "relu" or _has_hooks(block)):
            return None
        inner = block_parameters(block)
        if inner is None or inner[4] is not None or inner[0].shape != inner[2].shape:
            return None
        params.append(inner[:4])
    return (*first, params, *last)


def block_parameters(block: nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None] | None:
    """``(w1, b1, w2, b2, ws)`` of a fused block whose parts the kernels compute exactly, else None (the block
    then calls its submodules).

    The common case (two plain ``nn.Linear`` without hooks, no shortcut, no global hooks) is checked in one
    expression: this runs on every call of every block, where a Python call costs about a microsecond.
    """
    modules = block._modules
    first, second = modules["linear1"], modules["linear2"]
    g = _module_globals
    if (type(first) is _Linear and type(second) is _Linear and modules.get("shortcut") is None
            and not (first._forward_hooks or first._forward_pre_hooks or first._backward_hooks
                     or first._backward_pre_hooks or second._forward_hooks or second._forward_pre_hooks
                     or second._backward_hooks or second._backward_pre_hooks or g._global_forward_hooks
                     or g._global_forward_pre_hooks or g._global_backward_hooks or g._global_backward_pre_hooks)):
        p1, p2 = first._parameters, second._parameters
        w1, w2 = p1.get("weight"), p2.get("weight")
        if w1 is not None and w2 is not None:
            return w1, p1.get("bias"), w2, p2.get("bias"), None
    return _block_parameters(modules)


def _block_parameters(modules: dict) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None] | None:
    first, second = plain_linear(modules["linear1"]), plain_linear(modules["linear2"])
    if first is None or second is None or global_hooks():
        return None
    shortcut = modules.get("shortcut")
    if shortcut is None:
        return (*first, *second, None)
    projection = plain_linear(shortcut)
    if projection is None or projection[1] is not None:
        return None
    return (*first, *second, projection[0])
