"""The transformer FFN form: ``x + linear2(gelu(linear1(x)))`` with a 4x hidden width, as users write it (eager and
torch.compile) vs ``FusedResidualBlock(d, d, hidden_features=4 * d, activation="gelu", final_activation=None)``."""

from __future__ import annotations

import pytest

from .cases import Case
from .harness import Settings, run_case

# torch.compile's imports touch torch.jit.script_method, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_ffn(ffn_case: Case, benchmark, bench_settings: Settings) -> None:
    run_case(ffn_case, benchmark, bench_settings)
