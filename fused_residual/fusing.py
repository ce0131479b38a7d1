"""``fuse()`` and ``unfuse()``: swap reference blocks for fused ones in a model, in place, and back."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import composite
from .activations import Form, check_form
from .modules import FusedResidualBlock, FusedResidualNet, has_hooks, why_not_plain
from .reference import ResidualBlock, ResidualNet

# Hook dicts of nn.Module that fuse() hands over to the fused block (shared, so a handle's remove() still works).
_CARRIED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks")


# The activation modules a block may hold, by the activation they compute (their settings must match too).
_ACTIVATION_MODULES: dict[str, tuple[type[nn.Module], dict[str, object]]] = {
    "relu": (nn.ReLU, {}), "gelu": (nn.GELU, {"approximate": "none"}),
    "gelu_tanh": (nn.GELU, {"approximate": "tanh"}), "silu": (nn.SiLU, {}),
}
TOLERANCE = 1e-10
"""Largest relative difference (max |block - fused| / max |fused|, float64) at which the numerical check passes."""
_CHECK_ROWS = 4


def _activation_module_problem(name: str, child: nn.Module, form: Form) -> str | None:
    """Why ``child`` (a submodule other than the linears) is not an activation the fused block applies, or None."""
    wanted = [form.activation] + (["relu"] if form.final_activation == "relu" else [])
    for activation in wanted:
        cls, settings = _ACTIVATION_MODULES[activation]
        if type(child) is cls and all(getattr(child, k, None) == v for k, v in settings.items()):
            return None
    names = " or ".join(_describe(*_ACTIVATION_MODULES[a]) for a in dict.fromkeys(wanted))
    article = "an" if type(child).__name__[0] in "AEIOU" else "a"
    shown = _describe(type(child), {"approximate": getattr(child, "approximate", None)})
    return (f"its submodule {name} is {article} {shown}, not the {names} of activation={form.activation!r}, "
            f"final_activation={form.final_activation!r}")


def _describe(cls: type, settings: dict[str, object]) -> str:
    shown = {k: v for k, v in settings.items() if v is not None}
    return cls.__name__ + (f"({', '.join(f'{k}={v!r}' for k, v in shown.items())})" if shown else "")


def _why_not_fusable(block: nn.Module, block_type: type[nn.Module], form: Form) -> str | None:
    """Structural check: why ``block`` cannot be swapped for a fused block of ``form`` without changing what it
    computes or losing state, or None. Cheap, and run for every block, ``verify=False`` or not."""
    if type(block).forward is not block_type.forward:
        return f"{type(block).__name__} overrides forward"
    if block._backward_hooks and not block._is_full_backward_hook:
        return "it has a non-full backward hook (register_backward_hook), which sees a different autograd node"
    extra = [*block._parameters, *block._buffers]
    if extra:
        return (f"it holds parameters or buffers besides its linears' ({', '.join(extra)}), which the fused block "
                "would lose")
    modules = block._modules
    for name in ("linear1", "linear2"):
        why = why_not_plain(name, modules.get(name))
        if why is not None:
            return why
    for name, child in modules.items():
        if name in ("linear1", "linear2") or child is None:
            continue
        if any(has_hooks(m) for m in child.modules()):
            return f"its submodule {name} has hooks, and the fused block does not call it"
        if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            return f"it holds a submodule {name} ({type(child).__name__}) with parameters or buffers, which the " \
                   "fused block would lose"
        why = _activation_module_problem(name, child, form)
        if why is not None:
            return why
    for name, p in block.named_parameters():
        if type(p) not in (nn.Parameter, torch.Tensor):
            return (f"{name} is a {type(p).__name__}, not a plain tensor (a sharded parameter? fuse() before "
                    "fully_shard or FSDP)")
    return None


# ---- the numerical check -------------------------------------------------------------------------------------

_verified: dict[tuple, str | None] = {}  # configuration -> why the check failed, or None (passed)


def clear_verified() -> None:
    """Forget the numerical checks' results (each configuration is checked again on its next fuse())."""
    _verified.clear()


def _configuration(block: nn.Module, form: Form) -> tuple | None:
    """What the numerical check's result depends on: the class, widths, form, the kind and settings of each
    submodule, and the block's own plain attributes. None where an attribute cannot be compared (then the block
    is checked by itself, not cached)."""
    l1, l2 = block.linear1, block.linear2
    children = tuple((name, type(m), m.extra_repr()) for name, m in block._modules.items() if m is not None)
    attributes = []
    for name, value in vars(block).items():
        if name.startswith("_") or name == "training":
            continue
        if not isinstance(value, (int, float, str, bool, type(None), tuple, frozenset)):
            return None
        try:
            hash(value)
        except TypeError:
            return None
        attributes.append((name, type(value), value))
    return (type(block), l1.in_features, l1.out_features, l2.out_features, form, children, tuple(attributes))


def _why_not_equal(block: nn.Module, form: Form) -> str | None:
    """Numerical check, cached per configuration (``_configuration``): why ``block``'s forward does not compute
    what the fused block of ``form`` computes, or None."""
    key = _configuration(block, form)
    if key is not None and key in _verified:
        return _verified[key]
    why = _compare(block, form)
    if key is not None:
        _verified[key] = why
    return why


def _fresh_copy(block: nn.Module, device: torch.device, generator: torch.Generator) -> nn.Module:
    """A deep copy of ``block`` whose every parameter and buffer is a fresh float64 tensor on ``device`` (random
    parameters drawn from ``generator``): the block's own tensors are neither read nor copied."""
    memo: dict[int, object] = {}
    for p in block.parameters():
        bound = p.shape[-1] ** -0.5 if p.dim() and p.shape[-1] else 1.0
        data = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        memo[id(p)] = nn.Parameter(data.to(device), requires_grad=True)
    for b in block.buffers():
        memo[id(b)] = torch.zeros(b.shape, dtype=torch.float64 if b.is_floating_point() else b.dtype, device=device)
    return copy.deepcopy(block, memo)


def _compare(block: nn.Module, form: Form) -> str | None:
    weight = block.linear1.weight
    device = torch.device("cpu") if weight.device.type == "meta" else weight.device
    cuda = [device] if device.type == "cuda" else []
    # The user's forward may draw random numbers (dropout): from a forked generator, restored afterwards. Grad
    # mode, inference mode and autocast are the check's own, whatever the caller's.
    with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        torch.default_generator.manual_seed(0)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        try:
            original = _fresh_copy(block, device, generator)
        except Exception as e:  # an attribute deepcopy cannot copy
            return f"the check could not copy it ({type(e).__name__}: {e})"
        x = torch.randn(_CHECK_ROWS, block.linear1.in_features, generator=generator, dtype=torch.float64)
        dout = torch.randn(_CHECK_ROWS, block.linear2.out_features, generator=generator, dtype=torch.float64)
        x, dout = x.to(device), dout.to(device)
        params = list(original.parameters())
        names = ["x", *(n for n, _ in original.named_parameters())]
        for mode in ("train", "eval"):
            original.train(mode == "train")
            try:
                got, got_grads = _output_and_grads(original.forward, x, dout, params)
            except Exception as e:
                return (f"the check could not run its forward in float64 in {mode}() mode "
                        f"({type(e).__name__}: {e})")
            want, want_grads = _output_and_grads(
                lambda t: composite.block_of_modules(t, original.linear1, original.linear2, None, form), x, dout,
                params)
            why = _difference(got, want, "output")
            if why is None and len(got_grads) != len(want_grads):
                why = "output has no gradient"
            for name, g, w in zip(names, got_grads, want_grads, strict=False):
                why = why or _difference(g, w, f"gradient of {name}")
            if why is not None:
                return (f"its forward does not compute the fused block's {_math(form)}: in {mode}() mode the {why} "
                        f"(float64, fresh random weights and input)")
    return None


def _output_and_grads(forward: Callable, x: torch.Tensor, dout: torch.Tensor, params: list[torch.Tensor]):
    """``forward(x)`` and the gradients of ``<out, dout>`` with respect to ``x`` and ``params`` (zeros where the
    output does not depend on one); ``out`` is whatever ``forward`` returned if it is not a tensor."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    if not isinstance(out, torch.Tensor) or out.shape != dout.shape or not out.requires_grad:
        return out, []
    grads = torch.autograd.grad(out, [x, *params], dout, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip([x, *params], grads, strict=True)]


def _difference(got: object, want: torch.Tensor, what: str) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"{what} is a {type(got).__name__}, not a tensor"
    if got.shape != want.shape:
        return f"{what} has shape {tuple(got.shape)}, not {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"{what} is {got.dtype}, not {want.dtype}"
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if not diff <= TOLERANCE * max(scale, 1e-30):  # NaN fails too
        return f"{what} differs by {diff:.3g} (relative {diff / max(scale, 1e-30):.3g} > {TOLERANCE:g})"
    return None


def _math(form: Form) -> str:
    inner = f"linear2({form.activation}(linear1(x)))"
    return f"relu({inner} + x)" if form.final_activation == "relu" else f"x + {inner}"


def _fused_from(block: nn.Module, block_type: type[nn.Module], path: str, form: Form, verify: bool,
                left: list[str], recompute: bool = False) -> FusedResidualBlock | None:
    """A FusedResidualBlock of ``form`` holding ``block``'s own ``linear1``/``linear2`` (same Parameters) and its
    hooks; None (why, appended to ``left``) where the fused block would not compute exactly what ``block``
    does or would lose some of its state."""
    linear1, linear2 = getattr(block, "linear1", None), getattr(block, "linear2", None)
    if not isinstance(linear1, nn.Module) or not isinstance(linear2, nn.Module):
        raise TypeError(f"fuse(): {type(block).__name__} has no submodules linear1 and linear2")
    why = _why_not_fusable(block, block_type, form)
    if why is None and (linear1.in_features != linear2.out_features or linear1.out_features != linear2.in_features):
        raise ValueError(
            f"fuse(): {type(block).__name__} maps {linear1.in_features} -> {linear1.out_features} -> "
            f"{linear2.in_features} -> {linear2.out_features} features; a residual block needs "
            "linear1.in == linear2.out (the identity shortcut) and linear1.out == linear2.in"
        )
    if why is None and verify:
        why = _why_not_equal(block, form)
    if why is not None:
        left.append(f"fuse(): left {path or 'the model'} ({type(block).__name__}) unfused: {why}")
        return None
    fused = FusedResidualBlock(linear1.in_features, linear2.out_features, hidden_features=linear1.out_features,
                               activation=form.activation, final_activation=form.final_activation,
                               recompute=recompute, device="meta")
    fused.linear1, fused.linear2 = linear1, linear2
    _carry_hooks(block, fused)
    return fused


def fuse(model: nn.Module, block_type: type[nn.Module] = ResidualBlock, *, activation: str = "relu",
         final_activation: str | None = "relu", verify: bool = True, recompute: bool = False) -> nn.Module:
    """Swap, in place, every submodule that is a ``block_type`` for a FusedResidualBlock.

    The fused blocks share the original ``nn.Linear`` modules, hence the same Parameter objects: optimizer
    state stays valid; they take over the block's own hooks. A block used in several places becomes one fused
    block used in the same places. ``block_type`` may be a user's own class with ``linear1``/``linear2``
    submodules whose ``forward`` computes the form that ``activation`` and ``final_activation`` name (by default
    the reference's math; e.g. a transformer FFN ``x + linear2(gelu(linear1(x)))`` with ``activation="gelu",
    final_activation=None``).

    fuse() cannot read a ``forward``, so it checks each block before swapping it:

    - structurally: ``linear1``/``linear2`` plain ``nn.Linear`` without hooks (no ``weight_norm``/
      ``spectral_norm``, no subclass with its own ``forward``); any other submodule an activation of the form
      (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``) without hooks; no other parameters, buffers or submodules (they
      would be lost); plain (unsharded) parameters;
    - numerically (``verify=True``): the block's ``forward`` against the fused block's math on a float64 copy
      with fresh random weights and a few rows of input, output and gradients, in ``train()`` and ``eval()``
      mode, to a relative difference of ``TOLERANCE``; the global random state and the block are left as they
      were. It runs once per block class and configuration (widths, form, submodules, plain attributes).

    A block that fails either check stays as it is, with a warning that says why. ``verify=False`` skips the
    numerical check only. ``recompute=True`` makes every fused block keep only its input (and its final ReLU's sign
    bits) for backward (see ``FusedResidualBlock``). Returns ``model``; if ``model`` itself is a ``block_type``,
    returns its fused replacement (or ``model``, if it stays).
    """
    form = check_form(activation, final_activation)
    left: list[str] = []

    def swap(module: nn.Module, path: str) -> nn.Module | None:
        if not isinstance(module, block_type):
            return None
        return _fused_from(module, block_type, path, form, verify, left, recompute) or module

    model = _swap(model, swap)
    for message in left:
        warnings.warn(message, stacklevel=2)
    return model


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
        if module.recompute:
            left.append(f"unfuse(): left {path or 'the model'} fused: recompute=True, and fr.ResidualBlock keeps x, h "
                        "and out for backward (set recompute = False on the block to unfuse it)")
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
