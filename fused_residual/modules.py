"""Drop-in modules: same submodules, parameter names, order and init as the reference, fused forward."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import composite, plans
from .activations import Form, check_form
from .reference import ResidualBlock, ResidualNet

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
        self.linear1 = nn.Linear(in_features, hidden, **factory)
        self.linear2 = nn.Linear(hidden, out_features, **factory)
        self.shortcut = nn.Linear(in_features, out_features, bias=False, **factory) if projection else None

    @property
    def form(self) -> Form:
        return Form(self.activation, self.final_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = block_parameters(self)
        if params is None:
            return composite.block_of_modules(x, self.linear1, self.linear2, self.shortcut, self.form)
        return plans.run_block(x, *params, self.form)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.hidden_features != self.out_features:
            text += f", hidden_features={self.hidden_features}"
        if self.activation != "relu" or self.final_activation != "relu":
            text += f", activation={self.activation!r}, final_activation={self.final_activation!r}"
        return text + f", projection={self.projection}"


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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(in_features, hidden_features, **factory)
        self.blocks = nn.ModuleList(
            FusedResidualBlock(hidden_features, hidden_features, **factory) for _ in range(num_blocks)
        )
        self.linear2 = nn.Linear(hidden_features, out_features, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = net_parameters(self, x)
        if params is not None:
            return plans.run_net_inference(x, *params)
        # linear's output is not saved for its backward, so the ReLU may overwrite it (as the reference's does).
        x = F.relu(self.linear1(x), inplace=True)
        for block in self.blocks:
            x = block(x)
        return self.linear2(x)


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
    autograd, no autocast, not compiling, no hooks, every part exactly a plain linear or seed-form block."""
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


# Hook dicts of nn.Module that fuse() hands over to the fused block (shared, so a handle's remove() still works).
_CARRIED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks")


def _why_not_fusable(block: nn.Module, block_type: type[nn.Module]) -> str | None:
    """Why ``block`` cannot be swapped for a fused block that computes exactly the same, or None."""
    if type(block).forward is not block_type.forward:
        return f"{type(block).__name__} overrides forward"
    if block._backward_hooks and not block._is_full_backward_hook:
        return "it has a non-full backward hook (register_backward_hook), which sees a different autograd node"
    modules = block._modules
    for name in ("linear1", "linear2"):
        why = why_not_plain(name, modules.get(name))
        if why is not None:
            return why
    for name, child in modules.items():
        if name not in ("linear1", "linear2") and child is not None and any(
                has_hooks(m) for m in child.modules()):
            return f"its submodule {name} has hooks, and the fused block does not call it"
    return None


def _fused_from(block: nn.Module, block_type: type[nn.Module], path: str, form: Form) -> FusedResidualBlock | None:
    """A FusedResidualBlock of ``form`` holding ``block``'s own ``linear1``/``linear2`` (same Parameters) and its
    hooks; None, with a warning that says why, where the fused block would not compute exactly what ``block``
    does."""
    linear1, linear2 = getattr(block, "linear1", None), getattr(block, "linear2", None)
    if not isinstance(linear1, nn.Module) or not isinstance(linear2, nn.Module):
        raise TypeError(f"fuse(): {type(block).__name__} has no submodules linear1 and linear2")
    why = _why_not_fusable(block, block_type)
    if why is not None:
        warnings.warn(f"fuse(): left {path or 'the model'} ({type(block).__name__}) unfused: {why}", stacklevel=3)
        return None
    if linear1.in_features != linear2.out_features or linear1.out_features != linear2.in_features:
        raise ValueError(
            f"fuse(): {type(block).__name__} maps {linear1.in_features} -> {linear1.out_features} -> "
            f"{linear2.in_features} -> {linear2.out_features} features; a residual block needs "
            "linear1.in == linear2.out (the identity shortcut) and linear1.out == linear2.in"
        )
    fused = FusedResidualBlock(linear1.in_features, linear2.out_features, hidden_features=linear1.out_features,
                               activation=form.activation, final_activation=form.final_activation, device="meta")
    fused.linear1, fused.linear2 = linear1, linear2
    _carry_hooks(block, fused)
    return fused


def fuse(model: nn.Module, block_type: type[nn.Module] = ResidualBlock, *, activation: str = "relu",
         final_activation: str | None = "relu") -> nn.Module:
    """Swap, in place, every submodule that is a ``block_type`` for a FusedResidualBlock.

    The fused blocks share the original ``nn.Linear`` modules, hence the same Parameter objects: optimizer
    state stays valid; they take over the block's own hooks. A block used in several places becomes one fused
    block used in the same places. ``block_type`` may be a user's own class with ``linear1``/``linear2``
    submodules whose ``forward`` computes the form that ``activation`` and ``final_activation`` name (by default
    the reference's math; e.g. a transformer FFN ``x + linear2(gelu(linear1(x)))`` with ``activation="gelu",
    final_activation=None``). A block the fused one would not compute exactly (its own ``forward``, hooks on its
    linears, ``weight_norm``/``spectral_norm``, a linear subclass with its own ``forward``) is left as it is, with
    a warning that says why. Returns ``model``; if ``model`` itself is a ``block_type``, returns its fused
    replacement (or ``model``, if it stays).
    """
    form = check_form(activation, final_activation)

    def swap(module: nn.Module, path: str) -> nn.Module | None:
        if not isinstance(module, block_type):
            return None
        return _fused_from(module, block_type, path, form) or module

    return _swap(model, swap)


def _swap(model: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    """Replace, in place, each submodule of ``model`` (and ``model`` itself: the return value) by
    ``swap(module, path)``: a new module (whose submodules are then swapped in turn), the module itself to keep it
    as it is, or None to keep it and swap inside it. A module used in several places is swapped once, for one
    replacement used in all of them."""
    memo: dict[int, nn.Module] = {}
    replacement = swap(model, "")
    if replacement is None:
        replacement = model
    elif replacement is model:
        return model
    _swap_children(replacement, swap, memo, "")
    return replacement


def _swap_children(module: nn.Module, swap: Callable[[nn.Module, str], nn.Module | None],
                   memo: dict[int, nn.Module], prefix: str) -> None:
    # _modules, not named_children(): that lists a module used twice only once.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        replacement = memo.get(id(child))
        if replacement is None:
            swapped = swap(child, prefix + name)
            replacement = memo[id(child)] = child if swapped is None else swapped
            if swapped is not child:  # None (look inside it) or a new module (swap inside it in turn)
                _swap_children(replacement, swap, memo, f"{prefix}{name}.")
        if replacement is not child:
            setattr(module, name, replacement)


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Hand ``source``'s own hooks to ``target``: the same dicts, so their handles still remove them."""
    for name in _CARRIED_HOOKS:
        setattr(target, name, getattr(source, name))
    target._is_full_backward_hook = source._is_full_backward_hook
    target.train(source.training)


# ---- unfuse() ----------------------------------------------------------------------------------------------

def _why_not_unfusable(block: FusedResidualBlock) -> str | None:
    """Why ``block`` has no ``ResidualBlock`` that computes the same from the same parameters, or None."""
    if type(block) is not FusedResidualBlock:
        return f"it is a {type(block).__name__}, a subclass"
    if block.projection:
        return "it has a projection shortcut"
    if block.hidden_features != block.out_features:
        return f"hidden_features ({block.hidden_features}) != out_features ({block.out_features})"
    if block.activation != "relu" or block.final_activation != "relu":
        return f"activation={block.activation!r}, final_activation={block.final_activation!r}"
    extra = [name for name, child in block._modules.items()
             if name not in ("linear1", "linear2", "shortcut") or child is not None and name == "shortcut"]
    extra += [*block._parameters, *block._buffers]
    if extra:
        return f"it holds more than linear1 and linear2 ({', '.join(extra)})"
    return None


def _unfused_from(module: nn.Module, left: list[str], path: str) -> nn.Module | None:
    """The reference module for a fused block or net (sharing its submodules and hooks), ``module`` itself for a
    fused block that has none (why, appended to ``left``), or None for any other module."""
    if isinstance(module, FusedResidualBlock):
        why = _why_not_unfusable(module)
        if why is not None:
            left.append(f"unfuse(): left {path or 'the model'} fused: {why}, which fr.ResidualBlock does not compute")
            return module
        with torch.device("meta"):  # its own linears are replaced at once: allocate nothing, draw no random numbers
            plain = ResidualBlock(module.in_features, module.out_features)
        plain.linear1, plain.linear2 = module.linear1, module.linear2
    elif isinstance(module, FusedResidualNet):
        if (type(module) is not FusedResidualNet or list(module._modules) != ["linear1", "blocks", "linear2"]
                or module._parameters or module._buffers):
            left.append(f"unfuse(): left {path or 'the model'} a {type(module).__name__} (its blocks unfused): it "
                        "is a subclass or holds more than linear1, blocks and linear2")
            return None
        with torch.device("meta"):
            plain = ResidualNet(1, 1, 1, 0)
        plain.linear1, plain.blocks, plain.linear2 = module.linear1, module.blocks, module.linear2
    else:
        return None
    _carry_hooks(module, plain)
    return plain


def unfuse(model: nn.Module) -> nn.Module:
    """The inverse of ``fuse()``: swap, in place, every ``FusedResidualBlock`` for an ``fr.ResidualBlock`` and
    every ``FusedResidualNet`` for an ``fr.ResidualNet``.

    The plain modules hold the fused ones' own ``nn.Linear`` modules, hence the same Parameter objects (optimizer
    state stays valid) and the same state_dict; they take over the fused modules' hooks and training mode. A
    block used in several places becomes one plain block used in the same places. A fused block that
    ``ResidualBlock`` cannot express (a projection shortcut, ``hidden_features != out_features``, another
    activation or ``final_activation=None``, a subclass) stays fused, with a warning that says why. Returns
    ``model``; if ``model`` itself is a fused block or net, returns its plain replacement.
    """
    left: list[str] = []
    model = _swap(model, lambda module, path: _unfused_from(module, left, path))
    for message in left:
        warnings.warn(message, stacklevel=2)
    return model
