"""A whole net: ResidualNet (eager and torch.compile) vs FusedResidualNet with the same state_dict."""

from __future__ import annotations

import pytest

from .cases import Case
from .harness import Settings, run_case

# torch.compile's imports touch torch.jit.script_method, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_net(net_case: Case, benchmark, bench_settings: Settings) -> None:
    run_case(net_case, benchmark, bench_settings)
