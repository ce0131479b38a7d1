"""Drop-in modules: same submodules, parameter names, order and init as the reference, fused forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .reference import ResidualBlock


def _weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(linear.weight, linear.bias)``; for a plain nn.Linear read from its parameter dict directly.

    ``nn.Module.__getattr__`` costs about a microsecond a lookup, a quarter of a tiny block's time. Subclasses
    (parametrized modules, wrappers) and modules whose weight is not a registered parameter take the attribute.
    """
    params = linear._parameters
    if type(linear) is nn.Linear and "weight" in params:
        return params["weight"], params.get("bias")
    return linear.weight, linear.bias


class FusedResidualBlock(nn.Module):
    """``out = relu(linear2(relu(linear1(x))) + x)`` computed by the fused kernels.

    ``linear1: in -> out`` and ``linear2: out -> out`` are plain ``nn.Linear`` modules, created in that order,
    so a seed gives the reference block's parameters and state_dicts load both ways. With
    ``projection=True`` the shortcut is a learned ``shortcut = nn.Linear(in, out, bias=False)`` and
    ``in_features`` may differ from ``out_features``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
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
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.projection = projection
        self.linear1 = nn.Linear(in_features, out_features, **factory)
        self.linear2 = nn.Linear(out_features, out_features, **factory)
        self.shortcut = nn.Linear(in_features, out_features, bias=False, **factory) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = self._modules  # what self.linear1 reads, without nn.Module.__getattr__'s cost
        w1, b1 = _weight_and_bias(modules["linear1"])
        w2, b2 = _weight_and_bias(modules["linear2"])
        shortcut = modules.get("shortcut")
        return functional.residual_block(
            x, w1, b1, w2, b2, shortcut_weight=None if shortcut is None else _weight_and_bias(shortcut)[0]
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, projection={self.projection}"


class FusedResidualNet(nn.Module):
    """``linear2(blocks(relu(linear1(x))))``: the reference ``ResidualNet`` with fused blocks."""

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
        if self._inference_fast_path(x):
            return functional.residual_net_inference(
                x, *_weight_and_bias(self.linear1),
                [(*_weight_and_bias(b.linear1), *_weight_and_bias(b.linear2)) for b in self.blocks],
                *_weight_and_bias(self.linear2),
            )
        # linear's output is not saved for its backward, so the ReLU may overwrite it.
        x = F.relu(self.linear1(x), inplace=True)
        for block in self.blocks:
            x = block(x)
        return self.linear2(x)

    def _inference_fast_path(self, x: object) -> bool:
        """No autograd, no autocast, not being compiled, only our own block type: the net runs as one unit
        (one kernel where the Triton backend takes its widths)."""
        if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling() or functional.autocast_enabled():
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(type(b) is FusedResidualBlock and b.shortcut is None for b in self.blocks)


def _fused_from(block: nn.Module) -> FusedResidualBlock:
    """A FusedResidualBlock holding ``block``'s own ``linear1``/``linear2`` modules (same Parameters)."""
    linear1, linear2 = getattr(block, "linear1", None), getattr(block, "linear2", None)
    if not isinstance(linear1, nn.Linear) or not isinstance(linear2, nn.Linear):
        raise TypeError(f"fuse(): {type(block).__name__} has no nn.Linear submodules linear1 and linear2")
    if linear1.in_features != linear2.out_features:
        raise ValueError(
            f"fuse(): {type(block).__name__} maps {linear1.in_features} -> {linear2.out_features} features; "
            "the identity shortcut of a residual block needs them equal"
        )
    fused = FusedResidualBlock(linear1.in_features, linear2.out_features, device="meta")
    fused.linear1, fused.linear2 = linear1, linear2
    fused.train(block.training)
    return fused


def fuse(model: nn.Module, block_type: type[nn.Module] = ResidualBlock) -> nn.Module:
    """Swap, in place, every submodule that is a ``block_type`` for a FusedResidualBlock.

    The fused blocks share the original ``nn.Linear`` modules, hence the same Parameter objects: optimizer
    state stays valid. ``block_type`` may be a user's own class with ``linear1``/``linear2`` submodules and the
    reference's math. Returns ``model``; if ``model`` itself is a ``block_type``, returns its fused replacement.
    """
    if isinstance(model, block_type):
        return _fused_from(model)
    for name, child in list(model.named_children()):
        if isinstance(child, block_type):
            setattr(model, name, _fused_from(child))
        else:
            fuse(child, block_type)
    return model
