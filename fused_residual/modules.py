"""Drop-in modules: same submodules, parameter names, order and init as the reference, fused forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import composite, functional, routing
from .activations import Form, check_form


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
    computed again in backward (one GEMM more; on chip in the whole-block kernel). Gradients are the same.

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
        return Form(self.activation, self.final_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, False)

    def _forward(self, x: torch.Tensor, out_kept: bool) -> torch.Tensor:
        """``out_kept``: the caller keeps ``out`` for its own backward anyway (a net's next layer), so a recompute
        block keeps ``out`` itself, not a mask beside it."""
        params = routing.block_parameters(self)
        if params is None:
            return composite.block(x, self.linear1, self.linear2, self.shortcut, self.form)
        w1, b1, w2, b2, ws = params
        if not self.recompute:
            return functional.residual_block(x, w1, b1, w2, b2, shortcut_weight=ws, activation=self.activation,
                                             final_activation=self.final_activation)
        return functional.residual_block(x, w1, b1, w2, b2, shortcut_weight=ws, activation=self.activation,
                                         final_activation=self.final_activation, recompute=True, _out_kept=out_kept)

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
        params = routing.net_parameters(self, x)
        if params is not None:
            return functional.residual_net_inference(x, *params)
        # linear's output is not saved for its backward, so the ReLU may overwrite it (as the reference's does).
        x = F.relu(self.linear1(x), inplace=True)
        blocks = list(self.blocks)
        for i, block in enumerate(blocks):
            if getattr(block, "recompute", False) and type(block) is FusedResidualBlock and not (
                    routing._has_hooks(block) or routing.global_hooks()):
                # The next layer keeps this block's output as its input: a recompute block then needs no mask.
                after = blocks[i + 1] if i + 1 < len(blocks) else self.linear2
                x = block._forward(x, _keeps_its_input(after))
            else:
                x = block(x)
        return self.linear2(x)


def _keeps_its_input(module: nn.Module) -> bool:
    """Whether ``module``'s backward keeps its input: a recompute block, or a linear whose weight is trained."""
    if isinstance(module, FusedResidualBlock):
        return module.recompute
    return isinstance(module, nn.Linear) and module.weight.requires_grad
