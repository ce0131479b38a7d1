"""The kernels' recompute and packed-sign-bit paths under Triton's interpreter (fp32 and fp16), against float64 math
written here with plain ops, with poisoned outputs.

- whole-block forward writing the final ReLU's sign bits (``store_signs``);
- whole-block backward computing the hidden layer again on chip (``recompute``) and reading the sign bits
  (``sign_bits``), in the whole form and split by role;
- the fused linear kernel reading sign bits as the mask of A (rows on m, or on k for a weight gradient with
  split-K) and of the residual, and writing C's sign bits.

A ReLU decision within rounding of 0 may go either way in low precision; only there the float64 expectation takes
the decision the kernels' own default-mode forward made (``TIE``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from fused_residual import backends, signs

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import whole_block as wb  # noqa: E402
from fused_residual.kernels.fused_linear import fused_linear  # noqa: E402

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16]
TIE = {torch.float32: 1e-4, torch.float16: 2e-2}
NAN = float("nan")


def operands(rows, width, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    b1 = make(width) if bias else None
    return (make(rows, width), make(width, width, scale=width**-0.5), b1, make(width, width, scale=width**-0.5),
            make(width), make(rows, width))


def decided(pre64, kernel_value, band):
    """ReLU's pass mask: float64's, except within ``band`` of 0, where the kernel's stored value decides."""
    return torch.where(pre64.abs() <= band, kernel_value.double() > 0, pre64 > 0)


def block64(x, w1, b1, w2, b2, dout, h_kernel, out_kernel):
    """float64 (out, dx, dW1, db1, dW2, db2) of the reference block, ReLU ties decided by the kernels."""
    band = TIE[x.dtype]
    x64, w1_, w2_, b2_, g = x.double(), w1.double(), w2.double(), b2.double(), dout.double()
    pre1 = x64 @ w1_.t() + (b1.double() if b1 is not None else 0)
    mask1 = decided(pre1, h_kernel, band)
    h = pre1 * mask1
    pre2 = h @ w2_.t() + b2_ + x64
    mask2 = decided(pre2, out_kernel, band)
    g2 = g * mask2
    g1 = (g2 @ w2_) * mask1
    return pre2 * mask2, g1 @ w1_ + g2, g1.t() @ x64, g1.sum(0), g2.t() @ h, g2.sum(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,width", [(70, 24), (33, 32), (64, 16)])
def test_whole_block_forward_writes_the_sign_bits(dtype, rows, width):
    x, w1, b1, w2, b2, dout = operands(rows, width, dtype)
    out_default, h = wb.forward(x, w1, b1, w2, b2, store_saved=True)
    out = torch.full((rows, width), NAN, dtype=dtype)
    bits = torch.full((rows, signs.row_bytes(width)), 0xFF, dtype=torch.uint8)  # poison: every byte is written
    wb.forward(x, w1, b1, w2, b2, store_saved=False, store_signs=True, out=out, saved=bits)
    assert torch.equal(out, out_default)
    assert torch.equal(bits, signs.pack(out))
    expected = block64(x, w1, b1, w2, b2, dout, h, out_default)[0]
    assert_close(out, expected, "out")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,width,config", [(70, 24, None), (33, 32, None), (50, 32, (16, 4, 16))],
                         ids=["whole-24", "whole-32", "by-role-32"])
@pytest.mark.parametrize("need_dx,need_weights", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_whole_block_backward_recomputes_on_chip(dtype, rows, width, config, need_dx, need_weights, bias):
    x, w1, b1, w2, b2, dout = operands(rows, width, dtype, seed=width, bias=bias)
    out, h = wb.forward(x, w1, b1, w2, b2, store_saved=True)
    bits = signs.pack(out)
    dx = torch.full((rows, width), NAN, dtype=dtype) if need_dx else None
    got = wb.backward(dout, bits, None, x, w1, w2, need_dx=need_dx, need_weights=need_weights, dx=dx,
                      config=config, sign_bits=True, recompute=True, b1=b1)
    expected = block64(x, w1, b1, w2, b2, dout, h, out)[1:]
    names = ("dx", "dW1", "db1", "dW2", "db2")
    for name, actual, want, asked in zip(names, got, expected, (need_dx, *(need_weights,) * 4), strict=True):
        if not asked:
            assert actual is None, name
            continue
        assert_close(actual, want, name, scale=4)
    # The same as the default mode's backward, which reads the saved h and out.
    default = wb.backward(dout, out, h, x, w1, w2, need_dx=need_dx, need_weights=need_weights, config=config)
    for name, actual, want in zip(names, got, default, strict=True):
        if want is not None:
            assert_close(actual, want.double(), f"{name} vs the default mode", scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,features", [(40, 24), (37, 20)])
def test_fused_linear_reads_sign_bits_as_the_mask_of_a(dtype, rows, features):
    g = torch.Generator().manual_seed(rows)
    dout = torch.randn(rows, features, generator=g).to(dtype)
    y = torch.relu(torch.randn(rows, features, generator=g)).to(dtype)
    w = (torch.randn(features, 16, generator=g) / 4).to(dtype)
    bits = signs.pack(y)
    g2 = dout.double() * (y.double() > 0)
    out = torch.full((rows, 16), NAN, dtype=dtype)
    fused_linear(dout, w, relu_mask=bits, mask_bits=1, out=out)
    assert_close(out, g2 @ w.double(), "dY' W", scale=2)
    # A weight gradient: A = dY^T (the bits' rows on k), split over K, with its row sums.
    x = torch.randn(rows, 12, generator=g).to(dtype)
    dw, db = fused_linear(dout.t(), x, relu_mask=bits, mask_bits=2, rowsum=True, split_k=2)
    assert_close(dw, g2.t() @ x.double(), "dY'^T x", scale=4)
    assert_close(db, g2.sum(0), "row sums", scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_fused_linear_reads_sign_bits_as_the_mask_of_the_residual(dtype):
    g = torch.Generator().manual_seed(3)
    g1 = torch.randn(45, 24, generator=g).to(dtype)
    w1 = (torch.randn(24, 20, generator=g) / 5).to(dtype)
    dout = torch.randn(45, 20, generator=g).to(dtype)
    y = torch.relu(torch.randn(45, 20, generator=g)).to(dtype)
    dx = fused_linear(g1, w1, residual=dout, relu_mask=signs.pack(y), mask_on="residual", mask_bits=1)[0]
    assert_close(dx, g1.double() @ w1.double() + dout.double() * (y.double() > 0), "g1 W1 + dY'", scale=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,features", [(50, 40), (33, 20)])
def test_fused_linear_writes_the_sign_bits_of_c(dtype, rows, features):
    g = torch.Generator().manual_seed(features)
    h = torch.randn(rows, 32, generator=g).to(dtype)
    w2 = (torch.randn(features, 32, generator=g) / 6).to(dtype)
    b2 = torch.randn(features, generator=g).to(dtype)
    x = torch.randn(rows, features, generator=g).to(dtype)
    bits = torch.full((rows, signs.row_bytes(features)), 0xFF, dtype=torch.uint8)
    out = fused_linear(h, w2.t(), bias=b2, residual=x, activation="relu", signs_out=bits)[0]
    assert torch.equal(bits, signs.pack(out))
    assert_close(out, torch.relu(h.double() @ w2.double().t() + b2.double() + x.double()), "out", scale=2)
