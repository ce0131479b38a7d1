"""fused_residual: Triton kernels for the residual MLP block, a drop-in for PyTorch models.

``FusedResidualBlock`` / ``FusedResidualNet`` replace the reference ``ResidualBlock`` / ``ResidualNet``
(same parameters and state_dict keys); ``fuse(model)`` swaps blocks in an existing model, ``unfuse(model)``
swaps them back.
"""

from . import functional, ops  # noqa: F401  (ops registers the custom ops that torch.compile traces)
from .dispatch import ENV_VAR as BACKEND_ENV_VAR
from .fusing import fuse, unfuse
from .modules import FusedResidualBlock, FusedResidualNet
from .reference import ResidualBlock, ResidualNet

__all__ = [
    "BACKEND_ENV_VAR",
    "FusedResidualBlock",
    "FusedResidualNet",
    "ResidualBlock",
    "ResidualNet",
    "functional",
    "fuse",
    "unfuse",
]
__version__ = "0.1.0"
