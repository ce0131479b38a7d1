"""One residual block: eager reference, torch.compile, FusedResidualBlock; on CUDA also the bare GEMMs and
``torch._addmm_activation``. Forward under no_grad and a training step (forward + backward on a fixed dout)."""

from __future__ import annotations

import pytest

from .cases import Case
from .harness import Settings, run_case

# torch.compile's imports touch torch.jit.script_method, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_block(block_case: Case, benchmark, bench_settings: Settings) -> None:
    run_case(block_case, benchmark, bench_settings)
