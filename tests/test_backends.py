"""The backend switch: one dispatch point, never a silent fallback when Triton is forced."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fused_residual as fr
from fused_residual import backends


def test_auto_uses_torch_on_cpu(use_backend):
    use_backend("auto")
    assert backends.select(torch.empty(1)) is backends.fallback


def test_torch_backend_is_used_when_asked(use_backend):
    use_backend("torch")
    assert backends.name_of(backends.select(torch.empty(1))) == "torch"


def test_unknown_backend_name_is_a_value_error(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="'cudnn' is not one of auto, triton, torch"):
        fr.FusedResidualBlock(4, 4)(torch.randn(2, 4))


def test_forced_triton_on_cpu_without_interpreter_raises(use_backend, monkeypatch):
    use_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block = fr.FusedResidualBlock(4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="forced"), torch.no_grad():
        block(torch.randn(2, 4))


def test_forced_triton_without_triton_installed_raises(use_backend, monkeypatch):
    use_backend("triton")
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        fr.FusedResidualBlock(4, 4)(torch.randn(2, 4))


def test_auto_without_triton_uses_torch_even_for_cuda(use_backend, monkeypatch):
    use_backend("auto")
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    cuda_input = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert backends.select(cuda_input) is backends.fallback


def test_auto_sends_float64_to_torch_and_forced_triton_refuses_it(use_backend):
    use_backend("auto")
    assert backends.select(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)) is backends.fallback
    use_backend("triton")
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32, not torch.float64"):
        fr.FusedResidualBlock(4, 4).double()(torch.randn(2, 4, dtype=torch.float64))


def test_import_works_without_triton():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; import fused_residual as fr, torch; "
            "print(fr.FusedResidualBlock(3, 3)(torch.randn(2, 3)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 3])" in result.stdout
