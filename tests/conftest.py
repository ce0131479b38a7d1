"""Shared fixtures: one tolerance table, a verbose comparison helper, reference/fused pairs, backends."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It is chosen when a kernel is decorated,
# so this must happen before fused_residual.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_residual as fr  # noqa: E402
from fused_residual import backends  # noqa: E402

# (atol, rtol) for a result in `dtype` compared with a float64 computation of the same math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}

HAS_CUDA = torch.cuda.is_available()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor",
                 dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """``actual`` (any dtype) vs ``expected`` (float64) with the tolerance of ``dtype`` (default: actual's).

    ``scale`` widens the tolerance for sums over many terms. On failure, says how many elements are off and
    where the worst one is.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = atol * scale, rtol * scale
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
    bad = ~(((a - e).abs() <= atol + rtol * e.abs()) | same_nonfinite)
    if bad.any():
        err = torch.where(bad, (a - e).abs().nan_to_num(float("inf")), torch.zeros_like(a))
        worst = divmod(int(err.argmax()), a.shape[-1]) if a.dim() >= 2 else int(err.argmax())
        raise AssertionError(
            f"{name} ({dtype}, atol={atol:.1e}, rtol={rtol:.1e}): {int(bad.sum())} of {a.numel()} elements "
            f"differ; worst at {worst}: {a.flatten()[int(err.argmax())]!r} vs {e.flatten()[int(err.argmax())]!r}"
        )


def device_params():
    """pytest params for each device: cpu always, cuda marked and skipped where there is none."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                   pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])]


@pytest.fixture
def use_backend(monkeypatch):
    """``use_backend("torch" | "triton" | "auto")`` sets FUSED_RESIDUAL_BACKEND for one test."""

    def set_backend(name: str) -> None:
        if name == "triton" and not backends.triton_available():
            pytest.skip("triton is not installed")
        monkeypatch.setenv(backends.ENV_VAR, name)

    return set_backend


def seeded_pair(in_features: int, out_features: int, seed: int = 0, **factory):
    """(reference ResidualBlock, FusedResidualBlock) built from the same seed: identical parameters."""
    torch.manual_seed(seed)
    reference = fr.ResidualBlock(in_features, out_features).to(**factory)
    torch.manual_seed(seed)
    # Built in float32 then cast, like the reference: a seed gives other values when init runs in float64.
    fused = fr.FusedResidualBlock(in_features, out_features).to(**factory)
    return reference, fused


def float64_reference(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor):
    """Output and gradients (input, then each parameter by name) of ``module`` run in float64 on a copy."""
    import copy

    ref = copy.deepcopy(module).double()
    xr = x.detach().double().requires_grad_(True)
    out = ref(xr)
    out.backward(dout.double())
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in ref.named_parameters()})
    return out.detach(), grads


def run_with_grads(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor):
    xr = x.detach().clone().requires_grad_(True)
    out = module(xr)
    out.backward(dout)
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads
