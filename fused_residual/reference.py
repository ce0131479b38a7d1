"""The reference residual block and net: plain PyTorch, the semantics users have today.

Tests and benchmarks compare the fused modules against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """``out = relu(linear2(relu(linear1(x))) + x)`` with ``linear1: in -> out``, ``linear2: out -> out``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, out_features)
        self.linear2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.linear1(x))
        return F.relu(self.linear2(h) + x)


class ResidualNet(nn.Module):
    """``linear2(blocks(relu(linear1(x))))`` with ``num_blocks`` residual blocks of width ``hidden_features``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_blocks: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden_features)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_features, hidden_features) for _ in range(num_blocks))
        self.linear2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.linear1(x))
        for block in self.blocks:
            x = block(x)
        return self.linear2(x)
