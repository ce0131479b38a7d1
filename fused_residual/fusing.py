"""``fuse()`` and ``unfuse()``: swap reference blocks for fused ones in a model, in place, and back."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import routing
from .activations import Form, check_form
from .modules import FusedResidualBlock, FusedResidualNet
from .reference import ResidualBlock, ResidualNet

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
        why = routing.why_not_plain(name, modules.get(name))
        if why is not None:
            return why
    for name, child in modules.items():
        if name not in ("linear1", "linear2") and child is not None and any(
                routing._has_hooks(m) for m in child.modules()):
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
