"""The packed sign bits of the final ReLU (``fused_residual/signs.py``): layout and the backward rule."""

from __future__ import annotations

import pytest
import torch

from fused_residual import signs

NAN = float("nan")


def test_layout_worked_by_hand():
    out = torch.tensor([[1.0, -1.0, 0.0, NAN, 2.0, -0.0, 3.0, 1e-30, 5.0, -2.0],
                        [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 7.0]])
    bits = signs.pack(out)
    # Row 0: passes at columns 0, 3 (NaN), 4, 6, 7 -> 1 + 8 + 16 + 64 + 128 = 217; then column 8 -> 1.
    # Row 1: nothing in the first byte; column 9 -> bit 1 of byte 1 = 2.
    assert bits.dtype == torch.uint8 and bits.shape == (2, 2) and bits.is_contiguous()
    assert bits.tolist() == [[217, 1], [0, 2]]


@pytest.mark.parametrize("rows,features", [(1, 1), (3, 8), (17, 13), (64, 256), (5, 31)])
def test_round_trip_and_backward_rule(rows, features):
    g = torch.Generator().manual_seed(features)
    out = torch.relu(torch.randn(rows, features, generator=g))
    out[0, 0] = NAN
    bits = signs.pack(out)
    assert bits.shape == (rows, signs.row_bytes(features)) == (rows, -(-features // 8))
    assert torch.equal(signs.unpack(bits, features), ~(out <= 0))
    grad = torch.randn(rows, features, generator=g)
    expected = torch.ops.aten.threshold_backward(grad, out, 0)
    assert torch.equal(signs.relu_backward(grad, bits), expected)
    # The pad bits of a row's last byte are 0.
    pad = signs.row_bytes(features) * 8 - features
    if pad:
        assert (bits[:, -1] >> (8 - pad)).eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_floating_dtype(dtype):
    out = torch.tensor([[0.5, -0.5, 0.0, 2.0]], dtype=dtype)
    assert signs.pack(out).tolist() == [[1 + 8]]
