"""The Triton kernels themselves, run by Triton's interpreter on CPU (or on the GPU where there is one).

Each case is checked against float64 math written here, with ragged sizes that are multiples of no tile, several
tile configurations, non-contiguous operands, and poisoned outputs (NaN-filled before the launch) so that an
element the kernel fails to write shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

from fused_residual import backends

pytestmark = pytest.mark.interpreter

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import fused_linear as fl  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
SIZES = [1, 10, 17, 48, 130, 200]
# Interpreter configs: its default plus tiles smaller and larger than the sizes above.
CONFIGS = [None, (16, 16, 16, 1, 4), (64, 32, 32, 1, 4)] if not HAS_CUDA else [None]


def rand(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)


def reference(a, b, a2=None, b2=None, bias=None, residual=None, gate=None, relu=False):
    acc = a.double() @ b.double()
    if a2 is not None:
        acc = acc + a2.double() @ b2.double()
    if bias is not None:
        acc = acc + bias.double()
    if residual is not None:
        acc = acc + residual.double()
    if gate is not None:
        acc = torch.where(gate.double() <= 0, 0.0, acc)
    if relu:
        acc = torch.where(acc < 0, 0.0, acc)
    return acc


def scale_for(k):
    """Tolerance scale for sums of k products (rounding grows about like sqrt(k))."""
    return max(1.0, (k / 16) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m,k,n", [(1, 10, 10), (17, 48, 130), (130, 17, 48), (200, 130, 17), (48, 200, 1),
                                   (10, 1, 200)])
@pytest.mark.parametrize("epilogue", ["plain", "bias_relu", "bias_residual_relu", "gate", "second"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "default" if c is None else "x".join(map(str, c[:3])))
def test_fused_linear_epilogues_on_ragged_shapes(dtype, m, k, n, epilogue, config):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, w = rand(m, k, dtype=dtype, generator=g), rand(n, k, dtype=dtype, generator=g)
    kwargs = {}
    if epilogue in ("bias_relu", "bias_residual_relu"):
        kwargs.update(bias=rand(n, dtype=dtype, generator=g), relu=True)
    if epilogue == "bias_residual_relu":
        kwargs["residual"] = rand(m, n, dtype=dtype, generator=g)
    if epilogue == "gate":
        kwargs["gate"] = rand(m, n, dtype=dtype, generator=g)
    if epilogue == "second":
        kwargs.update(a2=rand(m, 13, dtype=dtype, generator=g), b2=rand(n, 13, dtype=dtype, generator=g).t(),
                      relu=True)
    out = poisoned(m, n, dtype)
    c, sums = fl.fused_linear(a, w.t(), out=out, config=config, **kwargs)
    assert c is out and sums is None
    assert not c.isnan().any(), f"{int(c.isnan().sum())} output elements never written"
    assert_close(c, reference(a, w.t(), **kwargs), "C", scale=scale_for(k + 13))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows,n_out,n_in", [(1, 10, 10), (200, 17, 48), (130, 48, 1), (1000, 33, 20)])
@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
def test_weight_gradient_split_k_and_row_sums(dtype, rows, n_out, n_in, split_k):
    """``dW = g^T a`` with the bias gradient as fused row sums; split-K slices summed in a fixed order."""
    g = torch.Generator().manual_seed(rows + split_k)
    grad, a = rand(rows, n_out, dtype=dtype, generator=g), rand(rows, n_in, dtype=dtype, generator=g)
    dw, db = fl.fused_linear(grad.t(), a, rowsum=True, split_k=split_k, out_dtype=dtype)
    assert dw.dtype == dtype and db.dtype == torch.float32
    assert_close(dw, grad.double().t() @ a.double(), "dW", scale=scale_for(rows))
    assert_close(db, grad.double().sum(0), "db", dtype=dtype, scale=scale_for(rows))
    again, _ = fl.fused_linear(grad.t(), a, rowsum=True, split_k=split_k, out_dtype=dtype)
    assert torch.equal(dw, again), "weight gradients must be deterministic"


@pytest.mark.parametrize("layout", ["a_transposed", "b_row_major", "strided", "output_strided"])
def test_any_strides(layout):
    g = torch.Generator().manual_seed(7)
    m, k, n = 33, 40, 27
    a = rand(m, k, generator=g)
    b = rand(n, k, generator=g).t()
    out = None
    if layout == "a_transposed":
        a = rand(k, m, generator=g).t()
    elif layout == "b_row_major":
        b = rand(k, n, generator=g)
    elif layout == "strided":
        a = rand(m, 2 * k, generator=g)[:, ::2]
        b = rand(2 * k, n + 5, generator=g)[::2, 2:2 + n]
    else:
        out = torch.full((n, m), float("nan"), device=DEVICE).t()
    residual = rand(n, m, generator=g).t()
    c, _ = fl.fused_linear(a, b, residual=residual, relu=True, out=out)
    assert not c.isnan().any()
    assert_close(c, reference(a, b, residual=residual, relu=True), "C", scale=scale_for(k))


def test_nan_and_inf_propagate_like_torch():
    a = rand(20, 16)
    w = rand(24, 16)
    a[3, 5] = float("nan")
    a[7, 0] = float("inf")
    c, _ = fl.fused_linear(a, w.t(), bias=rand(24), relu=True)
    expected = torch.relu(a.double() @ w.double().t())
    assert torch.equal(c.isnan(), (expected.isnan() | (a.double() @ w.double().t()).isnan()).to(DEVICE))
    assert c[3].isnan().all()


def test_empty_problems_launch_nothing_and_are_correct(monkeypatch):
    launches = count_launches(monkeypatch)
    c, _ = fl.fused_linear(rand(0, 8), rand(6, 8).t(), bias=rand(6), relu=True)
    assert c.shape == (0, 6) and launches() == 0
    c, _ = fl.fused_linear(rand(5, 0), rand(0, 6), bias=torch.ones(6, device=DEVICE), relu=True)
    assert torch.equal(c, torch.ones(5, 6, device=DEVICE))  # K = 0: the epilogue alone


def count_launches(monkeypatch):
    """Counts launches of every Triton kernel of the package (autotuned or fixed-config)."""
    from fused_residual.kernels import whole_block

    count = {"n": 0}

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            count["n"] += 1
            return self.kernel[grid]

    for module, names in ((fl, ("fused_linear_kernel", "fused_linear_autotuned")),
                          (whole_block, ("whole_block_forward_kernel", "whole_block_forward_autotuned",
                                         "whole_block_backward_kernel"))):
        for name in names:
            monkeypatch.setattr(module, name, Counting(getattr(module, name)))
    return lambda: count["n"]


@pytest.mark.parametrize("width,forward_launches,backward_launches", [(12, 1, 1), (200, 2, 4)],
                         ids=["whole_block", "two_gemm"])
def test_the_block_really_runs_the_kernels(monkeypatch, use_backend, width, forward_launches, backward_launches):
    import fused_residual as fr

    use_backend("triton")
    launches = count_launches(monkeypatch)
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(width, width, device=DEVICE)
    x = torch.randn(9, width, device=DEVICE, requires_grad=True)
    out = block(x)
    # whole block: one kernel; two GEMMs: linear1 + ReLU, linear2 + residual + ReLU
    assert launches() == forward_launches
    out.sum().backward()
    # whole block: one kernel; two GEMMs: g1, dx, dW2 (+db2), dW1 (+db1)
    assert launches() == forward_launches + backward_launches
    with torch.no_grad():
        block(torch.randn(0, width, device=DEVICE))
    assert launches() == forward_launches + backward_launches  # an empty batch launches nothing
