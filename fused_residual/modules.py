"""Drop-in modules: same submodules, parameter names, order and init as the reference, fused forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import composite, plans, saving
from .activations import REFERENCE_FORM, Form, check_form

_Linear = nn.Linear


class FusedResidualBlock(nn.Module):
    """``out = relu(linear2(relu(linear1(x))) + x)`` computed by the fused kernels, and its other forms.

    ``linear1: in -> hidden`` and ``linear2: hidden -> out`` are plain ``nn.Linear`` modules, created in that
    order (``hidden_features`` defaults to ``out_features``, the reference block), so a seed gives the reference
    block's parameters and state_dicts load both ways. Other forms:

    - ``projection=True``: a learned shortcut ``shortcut = nn.Linear(in, out, bias=False)``, ``in`` may differ
      from ``out``: ``out = relu(linear2(h) + shortcut(x))``;
    - ``activation``: the hidden activation, ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``;
    - ``final_activation=None``: the transformer FFN ``out = x + linear2(act(linear1(x)))``, e.g.
      ``FusedResidualBlock(d, d, hidden_features=4 * d, activation="gelu", final_activation=None)``.

    Memory (training): by default the block keeps for backward no more than eager PyTorch keeps for the same math.
    ``recompute=True`` keeps only ``x`` and, for a final ReLU, its sign as 1 bit per element; the hidden layer is
    computed again in backward (one GEMM more; on chip in the whole-block kernel). The gradients are the same.

    If a submodule is not what the kernels compute (hooks on it, an ``nn.Linear`` subclass with its own
    ``forward``, a replaced submodule), the block calls its submodules instead, with the same math.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden_features: int | None = None,
        activation: str = "relu",
        final_activation: str | None = "relu",
        projection: bool = False,
        recompute: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features != out_features and not projection:
            raise ValueError(
                f"in_features ({in_features}) != out_features ({out_features}): the identity shortcut needs "
                "equal sizes; pass projection=True for a learned shortcut"
            )
        check_form(activation, final_activation)
        self.activation = activation
        self.final_activation = final_activation
        hidden = out_features if hidden_features is None else hidden_features
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.hidden_features = hidden
        self.projection = projection
        self.recompute = bool(recompute)
        self.linear1 = nn.Linear(in_features, hidden, **factory)
        self.linear2 = nn.Linear(hidden, out_features, **factory)
        self.shortcut = nn.Linear(in_features, out_features, bias=False, **factory) if projection else None

    @property
    def form(self) -> Form:
        activation, final = self.activation, self.final_activation
        # The reference block's form without building one (this runs on every call)
        return REFERENCE_FORM if activation == "relu" and final == "relu" else Form(activation, final)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation, final = self.activation, self.final_activation
        form = REFERENCE_FORM if activation == "relu" and final == "relu" else Form(activation, final)  # self.form
        mode = saving.RECOMPUTE if self.recompute else saving.DEFAULT
        # block_parameters' common case, written out (this runs on every call): two plain nn.Linear without hooks,
        # no shortcut, no global hooks.
        modules = self._modules
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
                return plans.run_block(x, w1, p1.get("bias"), w2, p2.get("bias"), None, form, mode)
        params = _block_parameters(modules)
        if params is None:
            return composite.block_of_modules(x, self.linear1, self.linear2, self.shortcut, form)
        return plans.run_block(x, *params, form, mode)

    def _forward_in_net(self, x: torch.Tensor, out_kept: bool) -> torch.Tensor:
        """``forward`` (the caller checked that no hooks must see the call) for a net whose next layer keeps this
        block's output as its own input (``out_kept``): a recompute block then keeps no mask beside it."""
        params = block_parameters(self)
        if params is None:
            return composite.block_of_modules(x, self.linear1, self.linear2, self.shortcut, self.form)
        mode = saving.DEFAULT if not self.recompute else saving.RECOMPUTE_OUT_KEPT if out_kept else saving.RECOMPUTE
        return plans.run_block(x, *params, self.form, mode)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.hidden_features != self.out_features:
            text += f", hidden_features={self.hidden_features}"
        if self.activation != "relu" or self.final_activation != "relu":
            text += f", activation={self.activation!r}, final_activation={self.final_activation!r}"
        text += f", projection={self.projection}"
        return text + ", recompute=True" if self.recompute else text


class FusedResidualNet(nn.Module):
    """``linear2(blocks(relu(linear1(x))))``: the reference ``ResidualNet`` with fused blocks.

    Without autograd (and outside autocast and ``torch.compile``) the net runs as one unit, one kernel where the
    widths allow, when every part is what the kernels compute (plain ``nn.Linear`` layers and blocks, no hooks);
    otherwise it calls its submodules.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        num_blocks: int,
        *,
        recompute: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(in_features, hidden_features, **factory)
        self.blocks = nn.ModuleList(
            FusedResidualBlock(hidden_features, hidden_features, recompute=recompute, **factory)
            for _ in range(num_blocks)
        )
        self.linear2 = nn.Linear(hidden_features, out_features, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = net_parameters(self, x)
        if params is not None:
            return plans.run_net_inference(x, *params)
        # linear's output is not saved for its backward, so the ReLU may overwrite it (as the reference's does).
        x = F.relu(self.linear1(x), inplace=True)
        blocks = list(self.blocks)
        for i, block in enumerate(blocks):
            if type(block) is FusedResidualBlock and block.recompute and not (has_hooks(block) or global_hooks()):
                # The next layer keeps this block's output as its input: a recompute block then needs no mask.
                x = block._forward_in_net(x, _keeps_its_input(blocks[i + 1] if i + 1 < len(blocks) else self.linear2))
            else:
                x = block(x)
        return self.linear2(x)


def _keeps_its_input(module: nn.Module) -> bool:
    """Whether ``module``'s backward keeps its input: a recompute block, or a linear whose weight is trained."""
    if isinstance(module, FusedResidualBlock):
        return module.recompute
    return isinstance(module, nn.Linear) and module.weight.requires_grad


# ---- module inspection: what the kernels may compute in place of a module -----------------------------------

def has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward or backward hooks of its own."""
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
        if has_hooks(m):
            return None
        params = m._parameters
        if "weight" in params:  # the common case, without nn.Module.__getattr__'s cost
            return params["weight"], params.get("bias")
        return m.weight, m.bias
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and not has_hooks(m):
        return m.weight, m.bias
    return None


def why_not_plain(name: str, m: object) -> str | None:
    """Why ``m`` (a linear named ``name``) is not what the kernels compute, or None if it is."""
    if not isinstance(m, nn.Linear):
        return f"{name} is a {type(m).__name__}, not an nn.Linear"
    if type(m).forward is not nn.Linear.forward:
        return f"{name} is a {type(m).__name__} with its own forward"
    if has_hooks(m):
        return f"{name} has forward or backward hooks (weight_norm/spectral_norm register one)"
    return None


def net_parameters(net: nn.Module, x: object):
    """``(w_in, b_in, [(w1, b1, w2, b2), ...], w_out, b_out)`` when ``net`` may run as one unit, else None: no
    autograd, no autocast, not compiling, no hooks, every part exactly a plain linear or reference-form block."""
    if not isinstance(x, Tensor) or torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled():
        return None
    if torch._C._are_functorch_transforms_active() or has_hooks(net) or global_hooks():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in net.parameters())):
        return None
    modules = net._modules
    first, last = plain_linear(modules.get("linear1")), plain_linear(modules.get("linear2"))
    blocks = modules.get("blocks")
    if first is None or last is None or type(blocks) is not nn.ModuleList or has_hooks(blocks):
        return None
    params = []
    for block in blocks:
        if (type(block) is not FusedResidualBlock or block.activation != "relu"
                or block.final_activation != "relu" or has_hooks(block)):
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
