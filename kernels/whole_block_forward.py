"""Whole residual block forward in one kernel: h never leaves the chip unless training needs it.

The block ``out = final(act(x W1^T + b1) W2^T + b2 + x)``, ``act`` one of ``kernels/activations.py`` and
``final`` ReLU (the reference block) or nothing (the FFN form), both constexprs. The backend runs these kernels with the
registry's "light" activations only (``register_class``: ReLU today): the "heavy" ones compute right here but spill
registers in the backward beyond width 16 and in the forward at width 128 on sm_80, so they are not compiled ahead
of time and take the two-GEMM kernels.
``F`` = in = hidden = out features, padded to WIDTH, a power of two >= 16; the pad is masked to zero on load, never
copied.

Forward, per tile of BLOCK_M rows, in one of two forms (HIDDEN_CHUNK, a config of the autotuner):

- weights on chip (HIDDEN_CHUNK = 0, to WEIGHTS_ON_CHIP_WIDTH): a program per tile, or a persistent grid whose
  programs load both weights once and loop over tiles (an autotune choice):

    pre = x W1^T + b1                     fp32 accumulator; x read once in its own dtype, rounded on chip for the
                                          dot where it is wider than the weights (autocast)
    h   = act(pre)                        rounded to the weights' dtype (as the two-GEMM path)
    out = final(h W2^T + b2 + x)          the x tile already on chip is the residual, added un-rounded

- weights streamed (HIDDEN_CHUNK = C > 0, to MAX_FORWARD_WIDTH): the x tile and an fp32 accumulator of the output
  tile stay on chip while both weights stream from L2, C hidden units at a time (software-pipelined):

    for c in chunks of C hidden units:    pre_c = x W1[c, :]^T + b1[c];  h_c = act(pre_c) (rounded);
                                          acc += h_c W2[:, c]^T          (with STORE_SAVED also store h_c / pre_c)
    out = final(acc + b2 + x)             x re-read for the residual (from L2: the tile was just read)

  x read once from memory, out written once (in out's dtype); with STORE_SAVED (training) the saved tensor is written
  too: h where the registry's ``from_output`` says so (ReLU), else pre (``activations.saved_of``, by the constexpr
  FROM_OUTPUT); else h never leaves the chip. With STORE_SIGNS (training a recompute block, FINAL_RELU) the final
  ReLU's backward rule is written instead, as packed bits (``_signs.py``: ``M F / 8`` bytes) through ``saved_ptr``
  and its row stride ``stride_sm``; h is then computed again in backward. The weights are read from L2 once per
  program: ``2 F^2`` elements per tile when streamed (so larger tiles read less), at most ``2 * 128 * 128`` on chip.

Shapes: x, out, saved (M, F) with any strides; W1, W2 (F, F); b1, b2 (F,).
Offsets: int64 tile origins, int32 inside a tile.
Grid: ``(cdiv(M, BLOCK_M),)`` or ``(min(tiles, PROGRAMS_PER_SM * SMs),)``.
FLOPs: ``4 M F^2``.
Bytes: ``2 M F`` elements (``3 M F`` with the saved tensor; ``2 M F`` and ``M F / 8`` bytes with the signs), plus
the weights from L2 as above.

Beside this file: the configurations and width limits (``whole_block_configs.py``), the backward
(``whole_block_backward.py``), the host wrappers and the autotuner (``whole_block.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._cast import narrowed
from ._signs import store_signs
from .activations import apply, saved_of


@triton.jit
def _forward_tile(tile, x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                  stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                  HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr, STORE_SIGNS: tl.constexpr,
                  ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, FINAL_RELU: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr):
    """One row tile of the block, the weights already on chip."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    row0 = tl.cast(tile, tl.int64) * BLOCK_M
    tile_mask = (rows < M - row0)[:, None] & (feats < F)[None, :]
    x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                mask=tile_mask, other=0.0)
    acc = tl.dot(narrowed(x, w1t), w1t, input_precision=INPUT_PRECISION)
    if HAS_B1:
        acc += b1[None, :]
    # Padded columns are 0 * x, NaN where x is infinite: zero them so they cannot reach the real ones.
    pre = tl.where((feats >= F)[None, :], 0.0, acc)
    h = apply(pre, ACTIVATION).to(w2t.dtype)
    if STORE_SAVED:
        tl.store(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + feats[None, :] * stride_sf),
                 saved_of(pre.to(w2t.dtype), h, FROM_OUTPUT), mask=tile_mask)
    acc = tl.dot(h, w2t, input_precision=INPUT_PRECISION) + x.to(tl.float32)
    if HAS_B2:
        acc += b2[None, :]
    if FINAL_RELU:
        acc = apply(acc, "relu")
    tl.store(out_ptr + row0 * stride_om + (rows[:, None] * stride_om + feats[None, :] * stride_of),
             acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if STORE_SIGNS:
        # From out as stored (rounded to its dtype), the values the default mode's backward reads.
        store_signs(saved_ptr, acc.to(out_ptr.dtype.element_ty), row0, 0, rows, rows < M - row0, F, stride_sm, WIDTH)


@triton.jit
def _forward_tile_streamed(tile, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr, M, F,
                           stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
                           stride_om, stride_of, stride_sm, stride_sf,
                           HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr,
                           STORE_SIGNS: tl.constexpr, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                           FINAL_RELU: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                           HIDDEN_CHUNK: tl.constexpr):
    """One row tile of the block with the weights streamed from L2, HIDDEN_CHUNK hidden units at a time."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    chunk = tl.arange(0, HIDDEN_CHUNK)
    row0 = tl.cast(tile, tl.int64) * BLOCK_M
    mask_m = rows < M - row0
    mask_f = feats < F
    tile_mask = mask_m[:, None] & mask_f[None, :]
    x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                mask=tile_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
    for c0 in range(0, F, HIDDEN_CHUNK):
        hidden = c0 + chunk
        mask_h = hidden < F
        # W1 rows c0.. as a (WIDTH, HIDDEN_CHUNK) W1^T slice; W2 columns c0.. as a (HIDDEN_CHUNK, WIDTH) W2^T slice.
        w1t = tl.load(w1_ptr + feats[:, None] * stride_w1k + hidden[None, :] * stride_w1n,
                      mask=mask_f[:, None] & mask_h[None, :], other=0.0)
        w2t = tl.load(w2_ptr + hidden[:, None] * stride_w2k + feats[None, :] * stride_w2n,
                      mask=mask_h[:, None] & mask_f[None, :], other=0.0)
        pre = tl.dot(narrowed(x, w1t), w1t, input_precision=INPUT_PRECISION)
        if HAS_B1:
            pre += tl.load(b1_ptr + hidden, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        # Padded hidden units are 0 * x, NaN where x is infinite: zero them so they cannot reach the output.
        pre = tl.where(mask_h[None, :], pre, 0.0)
        h = apply(pre, ACTIVATION).to(w2t.dtype)
        if STORE_SAVED:
            tl.store(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + hidden[None, :] * stride_sf),
                     saved_of(pre.to(w2t.dtype), h, FROM_OUTPUT), mask=mask_m[:, None] & mask_h[None, :])
        acc = tl.dot(h, w2t, acc, input_precision=INPUT_PRECISION)
    # Read again (from L2) rather than kept in registers across the loop: that spilled beside the accumulator.
    x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                mask=tile_mask, other=0.0)
    acc += x.to(tl.float32)
    if HAS_B2:
        acc += tl.load(b2_ptr + feats, mask=mask_f, other=0.0).to(tl.float32)[None, :]
    if FINAL_RELU:
        acc = apply(acc, "relu")
    tl.store(out_ptr + row0 * stride_om + (rows[:, None] * stride_om + feats[None, :] * stride_of),
             acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
    if STORE_SIGNS:
        store_signs(saved_ptr, acc.to(out_ptr.dtype.element_ty), row0, 0, rows, mask_m, F, stride_sm, WIDTH)


@triton.jit
def whole_block_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr,
    M, F,
    stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
    stride_om, stride_of, stride_sm, stride_sf,
    M_BUCKET,  # autotune key only
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr, ACTIVATION: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,  # the registry's from_output: the saved tensor is act(pre), else pre
    STORE_SIGNS: tl.constexpr,  # the final ReLU's packed sign bits to saved_ptr (not with STORE_SAVED)
    FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # 0: a program per tile; else a persistent grid of this many per SM
    HIDDEN_CHUNK: tl.constexpr,  # 0: both weights on chip; else streamed from L2 this many hidden units at a time
):
    if HIDDEN_CHUNK > 0:
        _forward_tile_streamed(tl.program_id(0), x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr, M, F,
                               stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
                               stride_om, stride_of, stride_sm, stride_sf, HAS_B1, HAS_B2, STORE_SAVED, STORE_SIGNS,
                               ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M, HIDDEN_CHUNK)
    else:
        feats = tl.arange(0, WIDTH)
        mask_f = feats < F
        weight_mask = mask_f[:, None] & mask_f[None, :]
        # Both weights as W^T tiles (element (k, n) = W[n, k]) and both biases, once per program.
        w1t = tl.load(w1_ptr + feats[:, None] * stride_w1k + feats[None, :] * stride_w1n, mask=weight_mask, other=0.0)
        w2t = tl.load(w2_ptr + feats[:, None] * stride_w2k + feats[None, :] * stride_w2n, mask=weight_mask, other=0.0)
        b1 = tl.load(b1_ptr + feats, mask=mask_f & HAS_B1, other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + feats, mask=mask_f & HAS_B2, other=0.0).to(tl.float32)
        if PROGRAMS_PER_SM == 0:
            _forward_tile(tl.program_id(0), x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                          stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                          HAS_B1, HAS_B2, STORE_SAVED, STORE_SIGNS, ACTIVATION, FROM_OUTPUT, FINAL_RELU,
                          INPUT_PRECISION, WIDTH, BLOCK_M)
        else:
            for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
                _forward_tile(tile, x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                              stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                              HAS_B1, HAS_B2, STORE_SAVED, STORE_SIGNS, ACTIVATION, FROM_OUTPUT, FINAL_RELU,
                              INPUT_PRECISION, WIDTH, BLOCK_M)
