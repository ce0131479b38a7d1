"""The reference residual block and net: the original modules, with the semantics users have today.

They behave exactly as the project's original specification writes them:
an ``nn.ReLU(inplace=True)`` submodule named ``relu``, applied in place, and the shortcut added in place
(``out += identity``), so under autocast the block's output keeps the autocast dtype. Tests and benchmarks compare
the fused modules against these.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """``out = relu(linear2(relu(linear1(x))) + x)`` with ``linear1: in -> out``, ``linear2: out -> out``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, out_features)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.linear1(x)
        out = self.relu(out)
        out = self.linear2(out)
        out += identity
        out = self.relu(out)
        return out


class ResidualNet(nn.Module):
    """``linear2(blocks(relu(linear1(x))))`` with ``num_blocks`` residual blocks of width ``hidden_features``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_blocks: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.ModuleList([ResidualBlock(hidden_features, hidden_features) for _ in range(num_blocks)])
        self.linear2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear1(x)
        out = self.relu(out)
        for block in self.blocks:
            out = block(out)
        out = self.linear2(out)
        return out
