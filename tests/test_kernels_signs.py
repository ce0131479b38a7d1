"""The kernels' packed sign bits (``kernels/_signs.py``) against the layout of ``fused_residual/signs.py``, under the
interpreter: a test kernel packs a tile as an epilogue does and reads it back as a backward kernel does, with rows
on either axis."""

from __future__ import annotations

import pytest
import torch

from fused_residual import backends, signs

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fused_residual.kernels._signs import sign_passes, store_signs  # noqa: E402

pytestmark = pytest.mark.interpreter


@triton.jit
def _pack(out_ptr, bits_ptr, M, N, stride_om, stride_bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    col0 = tl.program_id(1) * BLOCK_N
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    mask_m = tile_m < M - row0
    mask = mask_m[:, None] & (tile_n < N - col0)[None, :]
    acc = tl.load(out_ptr + row0 * stride_om + col0 + tile_m[:, None] * stride_om + tile_n[None, :], mask=mask,
                  other=0.0)
    store_signs(bits_ptr, acc, row0, col0, tile_m, mask_m, N, stride_bits, BLOCK_N)


@triton.jit
def _read(bits_ptr, passes_ptr, passes_t_ptr, M, N, stride_bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (feats < N)[None, :]
    passes = sign_passes(bits_ptr, rows[:, None], feats[None, :], stride_bits, mask)
    tl.store(passes_ptr + rows[:, None] * N + feats[None, :], passes.to(tl.int8), mask=mask)
    # The same elements with rows on the second axis (a tile of g2^T).
    passes_t = sign_passes(bits_ptr, rows[None, :], feats[:, None], stride_bits, mask.T)
    tl.store(passes_t_ptr + feats[:, None] * M + rows[None, :], passes_t.to(tl.int8), mask=mask.T)


@pytest.mark.parametrize("rows,features,block_n", [(5, 8, 16), (37, 20, 16), (64, 64, 32), (33, 100, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_and_read_match_the_layout(rows, features, block_n, dtype):
    g = torch.Generator().manual_seed(rows)
    out = torch.relu(torch.randn(rows, features, generator=g)).to(dtype)
    out[rows // 2, features // 3] = float("nan")
    out[0, -1] = -0.0
    # Bits in a wider buffer (a row stride of its own) whose pad must stay untouched.
    buffer = torch.full((rows, signs.row_bytes(features) + 3), 0xAB, dtype=torch.uint8)
    bits = buffer[:, :signs.row_bytes(features)]
    grid = (triton.cdiv(rows, 16), triton.cdiv(features, block_n))
    _pack[grid](out, bits, rows, features, out.stride(0), bits.stride(0), BLOCK_M=16, BLOCK_N=block_n)
    assert torch.equal(bits, signs.pack(out))
    assert (buffer[:, signs.row_bytes(features):] == 0xAB).all()
    passes = torch.empty(rows, features, dtype=torch.int8)
    passes_t = torch.empty(features, rows, dtype=torch.int8)
    _read[grid](bits, passes, passes_t, rows, features, bits.stride(0), BLOCK_M=16, BLOCK_N=block_n)
    expected = ~(out <= 0)
    assert torch.equal(passes.bool(), expected)
    assert torch.equal(passes_t.bool(), expected.t())
