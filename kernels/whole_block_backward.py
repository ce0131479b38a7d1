"""Whole residual block backward in one kernel: dx and every weight gradient in one launch, summed inside it.

The block ``out = final(act(pre) W2^T + b2 + x)``, ``pre = x W1^T + b1``, as in ``whole_block_forward.py``:
``act`` one of ``kernels/activations.py`` and ``final`` ReLU or nothing, both constexprs; ``saved`` is what the
forward kept of the hidden layer (``activations.saved_of``). ``F`` = in = hidden = out features, padded to WIDTH,
a power of two >= 16; the pad is masked to zero on load, never copied.

Backward, a persistent grid whose programs loop over row tiles, in one of two forms (``BackwardConfig``):

- whole (HIDDEN_CHUNK = 0, to MAX_BACKWARD_WIDTH_WHOLE): P programs, each with both weights on chip and every
  weight gradient's fp32 accumulator in registers:

    g2  = dout * (out > 0)                aten's ReLU-backward rule: 0 where out <= 0 (FINAL_RELU; else g2 = dout)
    g1  = (g2 W2) * act'(saved)           ReLU: 0 where h <= 0
    dx  = g1 W1 + g2                      (NEED_DX; g2 added un-rounded, dx stored in dx's dtype)
    dW2 += g2^T act(saved),  dW1 += g1^T x,  db2 += sum g2,  db1 += sum g1   (NEED_WEIGHTS, fp32, in registers)

  At the end program p writes its partial sums to slot p of an fp32 workspace; the last program to arrive sums
  the slots in slot order (two levels, ``_reduce.py``) and writes dW1, db1, dW2, db2 in the weights' dtype:
  deterministic, no float atomics, no further launch.

- split by role (HIDDEN_CHUNK = C > 0, to MAX_BACKWARD_WIDTH[family]): the accumulators of all of dW1 and dW2 do not
  fit in one program's registers, so programs form G groups of ``roles = S + F / C`` (S = DX_SHARE, ``dx_share``):
  S programs of a group compute dx as above (both weights on chip, no accumulators), and one program per chunk c
  of C hidden units computes, transposed so that every GEMM reads its operands as loaded,

    g1[:, c]^T = (W2[:, c]^T g2^T) * act'(saved[:, c]^T)
    dW2[:, c] += g2^T act(saved[:, c]),  dW1[c, :] += g1[:, c]^T x,  db1[c] += sum g1[:, c],  db2 += sum g2

  (g2 masked through the load's predicate) and the G programs of each chunk sum their partials as above, one
  reduction per chunk (chunk 0 writes db2). The programs of a group walk the same tiles, so dout, out, saved and
  x come from memory about once and from L2 for the other roles.

A recompute block (RECOMPUTE) kept no hidden layer: every program that reads ``saved`` computes it again from the
x tile and W1 on chip, ``saved = saved_of(x W1^T + b1)`` rounded as the forward rounded it (``saved_ptr`` is then
``b1``, with HAS_B1): one GEMM more per tile (``2 M F^2`` FLOPs; split: in the dx programs and, per chunk, in the
weight programs, which read the chunk's rows of W1), no further launch, ``saved`` never read. Its final ReLU's rule
may come as packed sign bits (SIGN_BITS, ``_signs.py``): ``out_ptr`` then points to them and ``stride_om`` is their
row stride (``M F / 8`` bytes read instead of ``M F`` elements).

Shapes: x, out, saved, dout, dx (M, F) with any strides; W1, W2 (F, F); gradients as the weights.
Offsets: int64 tile origins, int32 inside a tile.
Grids: whole ``(P,)`` with ``P = min(tiles, 2 * SMs)``, split ``((S [NEED_DX] + F / C [NEED_WEIGHTS]) * G,)`` with
``G = max(1, P // (S + F / C))``.
FLOPs: ``4 M F^2`` for dx, ``+ 4 M F^2`` for the weight gradients (split: ``+ 6 M F^2``, g1 computed again by the
weight programs).
Bytes: ``M F * (3 + [dx] + [x])`` elements (``- 1`` without a final ReLU: no out) plus ``~(P + 2 sqrt(P)) * 2 (F^2
+ F)`` fp32 partials written and read once (split: ``(G + 2 sqrt(G)) * (2 C F + C + F)`` per chunk), against ~13
passes of ``M F`` for the two-GEMM backward.

Beside this file: the configurations and width limits (``whole_block_configs.py``), the forward
(``whole_block_forward.py``), the host wrappers (``whole_block.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._cast import narrowed
from ._reduce import sum_slots_in_order
from ._signs import sign_passes
from .activations import apply, gradient, output_from_saved, saved_of


@triton.jit
def whole_block_backward_kernel(
    dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    ws_ptr, counters_ptr,
    M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k,
    reduce_group,  # programs per group of the in-kernel weight-gradient reduction (see _reduce.py)
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,  # the registry's from_output: the saved tensor is act(pre), else pre
    FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    HIDDEN_CHUNK: tl.constexpr,  # 0: every program computes everything; else programs split by role (see above)
    DX_SHARE: tl.constexpr,  # with HIDDEN_CHUNK: programs computing dx per group (see _backward_by_role)
    SIGN_BITS: tl.constexpr = False,  # FINAL_RELU's rule from packed bits at out_ptr (row stride stride_om)
    RECOMPUTE: tl.constexpr = False,  # saved computed again from x and W1; saved_ptr is b1 (HAS_B1)
    HAS_B1: tl.constexpr = False,
):
    if HIDDEN_CHUNK > 0:
        _backward_by_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                          db2_ptr, ws_ptr, counters_ptr, M, F,
                          stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                          stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                          stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
                          NEED_DX, NEED_WEIGHTS, ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH,
                          BLOCK_M, HIDDEN_CHUNK, DX_SHARE, SIGN_BITS, RECOMPUTE, HAS_B1)
    else:
        _backward_whole(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                        db2_ptr, ws_ptr, counters_ptr, M, F,
                        stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                        stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                        stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
                        NEED_DX, NEED_WEIGHTS, ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH,
                        BLOCK_M, SIGN_BITS, RECOMPUTE, HAS_B1)


@triton.jit
def _hidden_again(x, w1, b1, feats, F, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """``saved`` as the forward kept it, computed again: ``x W1^T + b1`` (``w1`` the rows of W1 as stored, ``feats``
    their hidden units), the activation (or not, by FROM_OUTPUT), rounded to the weights' dtype."""
    pre = tl.dot(narrowed(x, w1), tl.trans(w1), input_precision=INPUT_PRECISION) + b1[None, :]
    # Padded hidden units are 0 * x, NaN where x is infinite: zero them, as the forward does.
    pre = tl.where((feats >= F)[None, :], 0.0, pre)
    return saved_of(pre.to(w1.dtype), apply(pre, ACTIVATION).to(w1.dtype), FROM_OUTPUT)


@triton.jit
def _backward_whole(
    dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    ws_ptr, counters_ptr, M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    SIGN_BITS: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_B1: tl.constexpr,
):
    """Every program computes dx and all the weight gradients of its tiles (HIDDEN_CHUNK = 0)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    mask_f = feats < F
    weight_mask = mask_f[:, None] & mask_f[None, :]
    # Both weights as they are stored, (n, k): g2 @ W2 and g1 @ W1 read them untransposed.
    w1 = tl.load(w1_ptr + feats[:, None] * stride_w1n + feats[None, :] * stride_w1k, mask=weight_mask, other=0.0)
    w2 = tl.load(w2_ptr + feats[:, None] * stride_w2n + feats[None, :] * stride_w2k, mask=weight_mask, other=0.0)
    if RECOMPUTE:
        b1 = tl.load(saved_ptr + feats, mask=mask_f & HAS_B1, other=0.0).to(tl.float32)  # saved_ptr is b1

    dw1 = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
    dw2 = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
    db1 = tl.zeros((WIDTH,), dtype=tl.float32)
    db2 = tl.zeros((WIDTH,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        tile_mask = (rows < M - row0)[:, None] & mask_f[None, :]
        inner_m = rows[:, None]
        g2 = tl.load(dout_ptr + row0 * stride_dm + (inner_m * stride_dm + feats[None, :] * stride_df),
                     mask=tile_mask, other=0.0)
        if FINAL_RELU:
            if SIGN_BITS:
                g2 = tl.where(sign_passes(out_ptr + row0 * stride_om, inner_m, feats[None, :], stride_om, tile_mask),
                              g2, 0.0)
            else:
                out = tl.load(out_ptr + row0 * stride_om + (inner_m * stride_om + feats[None, :] * stride_of),
                              mask=tile_mask, other=0.0)
                g2 = tl.where(out <= 0, 0.0, g2)
        if RECOMPUTE:
            x = tl.load(x_ptr + row0 * stride_xm + (inner_m * stride_xm + feats[None, :] * stride_xf),
                        mask=tile_mask, other=0.0)
            saved = _hidden_again(x, w1, b1, feats, F, ACTIVATION, FROM_OUTPUT, INPUT_PRECISION)
        else:
            saved = tl.load(saved_ptr + row0 * stride_sm + (inner_m * stride_sm + feats[None, :] * stride_sf),
                            mask=tile_mask, other=0.0)
        g2_low = narrowed(g2, w2)  # the dots run in the weights' dtype; dx adds g2 itself
        g1 = tl.dot(g2_low, w2, input_precision=INPUT_PRECISION)
        g1 = gradient(g1, saved, ACTIVATION).to(w1.dtype)
        if NEED_DX:
            dx = tl.dot(g1, w1, input_precision=INPUT_PRECISION) + g2.to(tl.float32)
            tl.store(dx_ptr + row0 * stride_dxm + (inner_m * stride_dxm + feats[None, :] * stride_dxf),
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_WEIGHTS:
            if not RECOMPUTE:
                x = tl.load(x_ptr + row0 * stride_xm + (inner_m * stride_xm + feats[None, :] * stride_xf),
                            mask=tile_mask, other=0.0)
            h = output_from_saved(saved, ACTIVATION, FROM_OUTPUT)
            dw2 = tl.dot(tl.trans(g2_low), h, dw2, input_precision=INPUT_PRECISION)
            dw1 = tl.dot(tl.trans(g1), narrowed(x, w1), dw1, input_precision=INPUT_PRECISION)
            db2 += tl.sum(g2_low.to(tl.float32), axis=0)
            db1 += tl.sum(g1.to(tl.float32), axis=0)
    if NEED_WEIGHTS:
        # Program pid's partials to slot pid; the last program to arrive writes their sum, taken in slot order.
        square = feats[:, None] * WIDTH + feats[None, :]
        slot = 2 * WIDTH * WIDTH + 2 * WIDTH
        mine = ws_ptr + tl.cast(pid, tl.int64) * slot
        tl.store(mine + square, dw1)
        tl.store(mine + WIDTH * WIDTH + square, dw2)
        tl.store(mine + 2 * WIDTH * WIDTH + feats, db1)
        tl.store(mine + 2 * WIDTH * WIDTH + WIDTH + feats, db2)
        if sum_slots_in_order(ws_ptr, counters_ptr, pid, programs, reduce_group, slot, 1024):
            total = ws_ptr + tl.cast(programs + tl.cdiv(programs, reduce_group), tl.int64) * slot
            _write_unpadded(total, dw1_ptr, F, F, stride_dw1n, stride_dw1k, WIDTH)
            _write_unpadded(total + WIDTH * WIDTH, dw2_ptr, F, F, stride_dw2n, stride_dw2k, WIDTH)
            _write_unpadded(total + 2 * WIDTH * WIDTH, db1_ptr, 1, F, 0, 1, WIDTH)
            _write_unpadded(total + 2 * WIDTH * WIDTH + WIDTH, db2_ptr, 1, F, 0, 1, WIDTH)


@triton.jit
def _masked_dout(dout_ptr, out_ptr, i, j, mask, stride_di, stride_dj, stride_oi, stride_oj, FINAL_RELU: tl.constexpr,
                 SIGN_BITS: tl.constexpr, ROWS_ON_I: tl.constexpr):
    """The block ``g2[i, j] = dout[i, j] * (out[i, j] > 0)`` (aten's rule: 0 where out <= 0; ``dout`` itself without
    a final ReLU), from pointers already at the tile's origin; the strides decide which of i, j are rows
    (ROWS_ON_I says so for packed sign bits, whose row stride is then ``stride_oi`` or ``stride_oj``)."""
    if FINAL_RELU:  # as the load's predicate: g2 stays a plain load, which the GEMMs read without a copy each
        if SIGN_BITS:
            if ROWS_ON_I:
                mask = mask & sign_passes(out_ptr, i[:, None], j[None, :], stride_oi, mask)
            else:
                mask = mask & sign_passes(out_ptr, j[None, :], i[:, None], stride_oj, mask)
        else:
            out = tl.load(out_ptr + (i[:, None] * stride_oi + j[None, :] * stride_oj), mask=mask, other=0.0)
            mask = mask & ~(out <= 0)
    return tl.load(dout_ptr + (i[:, None] * stride_di + j[None, :] * stride_dj), mask=mask, other=0.0)


@triton.jit
def _backward_by_role(
    dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    ws_ptr, counters_ptr, M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    HIDDEN_CHUNK: tl.constexpr, DX_SHARE: tl.constexpr, SIGN_BITS: tl.constexpr, RECOMPUTE: tl.constexpr,
    HAS_B1: tl.constexpr,
):
    """Programs split by role (HIDDEN_CHUNK > 0). Programs form groups of ``roles`` consecutive ones: with NEED_DX
    the first DX_SHARE of a group compute dx, with NEED_WEIGHTS each of the next ones the weight gradients of one
    chunk of HIDDEN_CHUNK hidden units (DX_SHARE balances dx's ``4 F^2`` FLOPs per row against a chunk's
    ``6 F HIDDEN_CHUNK``)."""
    chunks: tl.constexpr = WIDTH // HIDDEN_CHUNK
    dx_share: tl.constexpr = DX_SHARE * NEED_DX
    roles: tl.constexpr = dx_share + NEED_WEIGHTS * chunks
    pid = tl.program_id(0)
    role = pid % roles
    group = pid // roles
    groups = tl.num_programs(0) // roles
    if NEED_DX:
        if NEED_WEIGHTS:
            if role < dx_share:
                _dx_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, group * dx_share + role,
                         groups * dx_share, stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf,
                         stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                         ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M, SIGN_BITS, RECOMPUTE,
                         HAS_B1)
            else:
                _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                              db2_ptr, ws_ptr, counters_ptr, M, F, role - dx_share, group, groups,
                              stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                              stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n,
                              stride_dw2k, reduce_group, ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION,
                              WIDTH, BLOCK_M, HIDDEN_CHUNK, SIGN_BITS, RECOMPUTE, HAS_B1)
        else:
            _dx_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, pid, tl.num_programs(0),
                     stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                     stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                     ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M, SIGN_BITS, RECOMPUTE,
                     HAS_B1)
    else:
        _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                      ws_ptr, counters_ptr, M, F, role, group, groups,
                      stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                      stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n,
                      stride_dw2k, reduce_group, ACTIVATION, FROM_OUTPUT, FINAL_RELU, INPUT_PRECISION, WIDTH,
                      BLOCK_M, HIDDEN_CHUNK, SIGN_BITS, RECOMPUTE, HAS_B1)


@triton.jit
def _dx_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, index, programs,
             stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
             stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
             ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, FINAL_RELU: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, SIGN_BITS: tl.constexpr,
             RECOMPUTE: tl.constexpr, HAS_B1: tl.constexpr):
    """``dx = ((g2 W2) * act'(saved)) W1 + g2`` on tiles ``index, index + programs, ...``, both weights on chip."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    mask_f = feats < F
    weight_mask = mask_f[:, None] & mask_f[None, :]
    w1 = tl.load(w1_ptr + feats[:, None] * stride_w1n + feats[None, :] * stride_w1k, mask=weight_mask, other=0.0)
    w2 = tl.load(w2_ptr + feats[:, None] * stride_w2n + feats[None, :] * stride_w2k, mask=weight_mask, other=0.0)
    if RECOMPUTE:
        b1 = tl.load(saved_ptr + feats, mask=mask_f & HAS_B1, other=0.0).to(tl.float32)  # saved_ptr is b1
    for tile in range(index, tl.cdiv(M, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        tile_mask = (rows < M - row0)[:, None] & mask_f[None, :]
        g2 = _masked_dout(dout_ptr + row0 * stride_dm, out_ptr + row0 * stride_om, rows, feats, tile_mask,
                          stride_dm, stride_df, stride_om, stride_of, FINAL_RELU, SIGN_BITS, True)
        if RECOMPUTE:
            x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                        mask=tile_mask, other=0.0)
            saved = _hidden_again(x, w1, b1, feats, F, ACTIVATION, FROM_OUTPUT, INPUT_PRECISION)
        else:
            saved = tl.load(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + feats[None, :] * stride_sf),
                            mask=tile_mask, other=0.0)
        g1 = tl.dot(narrowed(g2, w2), w2, input_precision=INPUT_PRECISION)
        g1 = gradient(g1, saved, ACTIVATION).to(w1.dtype)
        dx = tl.dot(g1, w1, input_precision=INPUT_PRECISION) + g2.to(tl.float32)
        tl.store(dx_ptr + row0 * stride_dxm + (rows[:, None] * stride_dxm + feats[None, :] * stride_dxf),
                 dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                  ws_ptr, counters_ptr, M, F, chunk, index, programs,
                  stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                  stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k,
                  reduce_group, ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, FINAL_RELU: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                  HIDDEN_CHUNK: tl.constexpr, SIGN_BITS: tl.constexpr, RECOMPUTE: tl.constexpr,
                  HAS_B1: tl.constexpr):
    """The weight gradients of hidden units ``c = chunk * HIDDEN_CHUNK ...`` on tiles ``index, index + programs,
    ...``, computed transposed so that every GEMM reads its operands as loaded (no transpose in registers):
    ``g1[:, c]^T = (W2[:, c]^T g2^T) * act'(saved[:, c]^T)``, ``dW2[:, c] += g2^T act(saved[:, c])``,
    ``dW1[c, :] += g1[:, c]^T x``, ``db1[c] += sum g1[:, c]``, ``db2 += sum g2``; then the chunk's programs sum
    their partials in slot order (one reduction per chunk; chunk 0 writes db2). RECOMPUTE: ``saved[:, c]`` from the
    x tile and the chunk's rows of W1 (``saved[:, c]^T`` its transpose)."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    units = tl.arange(0, HIDDEN_CHUNK)
    mask_f = feats < F
    c0 = chunk * HIDDEN_CHUNK
    hidden = c0 + units
    mask_h = hidden < F
    # W2[:, c]^T: element (j, n) = W2[n, c0 + j].
    w2ct = tl.load(w2_ptr + hidden[:, None] * stride_w2k + feats[None, :] * stride_w2n,
                   mask=mask_h[:, None] & mask_f[None, :], other=0.0)
    if RECOMPUTE:  # W1[c, :] as stored, and b1[c] (saved_ptr is b1)
        w1c = tl.load(w1_ptr + hidden[:, None] * stride_w1n + feats[None, :] * stride_w1k,
                      mask=mask_h[:, None] & mask_f[None, :], other=0.0)
        b1c = tl.load(saved_ptr + hidden, mask=mask_h & HAS_B1, other=0.0).to(tl.float32)
    dw1 = tl.zeros((HIDDEN_CHUNK, WIDTH), dtype=tl.float32)
    dw2 = tl.zeros((WIDTH, HIDDEN_CHUNK), dtype=tl.float32)
    db1 = tl.zeros((HIDDEN_CHUNK,), dtype=tl.float32)
    db2 = tl.zeros((WIDTH,), dtype=tl.float32)
    for tile in range(index, tl.cdiv(M, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        mask_m = rows < M - row0
        # g2^T (WIDTH, BLOCK_M) and saved[:, c]^T (HIDDEN_CHUNK, BLOCK_M), read transposed through the strides.
        g2t = narrowed(_masked_dout(dout_ptr + row0 * stride_dm, out_ptr + row0 * stride_om, feats, rows,
                                    mask_f[:, None] & mask_m[None, :], stride_df, stride_dm, stride_of, stride_om,
                                    FINAL_RELU, SIGN_BITS, False), w2ct)
        x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                    mask=mask_m[:, None] & mask_f[None, :], other=0.0)
        if RECOMPUTE:
            saved = _hidden_again(x, w1c, b1c, hidden, F, ACTIVATION, FROM_OUTPUT, INPUT_PRECISION)
            saved_t = tl.trans(saved)
        else:
            saved_t = tl.load(saved_ptr + row0 * stride_sm + (hidden[:, None] * stride_sf + rows[None, :] * stride_sm),
                              mask=mask_h[:, None] & mask_m[None, :], other=0.0)
            saved = tl.load(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + hidden[None, :] * stride_sf),
                            mask=mask_m[:, None] & mask_h[None, :], other=0.0)
        g1t = tl.dot(w2ct, g2t, input_precision=INPUT_PRECISION)
        g1t = gradient(g1t, saved_t, ACTIVATION).to(w2ct.dtype)
        dw2 = tl.dot(g2t, output_from_saved(saved, ACTIVATION, FROM_OUTPUT), dw2, input_precision=INPUT_PRECISION)
        dw1 = tl.dot(g1t, narrowed(x, w2ct), dw1, input_precision=INPUT_PRECISION)
        db2 += tl.sum(g2t.to(tl.float32), axis=1)
        db1 += tl.sum(g1t.to(tl.float32), axis=1)
    slot: tl.constexpr = 2 * HIDDEN_CHUNK * WIDTH + HIDDEN_CHUNK + WIDTH
    ws_ptr += tl.cast(chunk, tl.int64) * (programs + tl.cdiv(programs, reduce_group) + 1) * slot
    counters_ptr += chunk * (tl.cdiv(programs, reduce_group) + 1)
    mine = ws_ptr + tl.cast(index, tl.int64) * slot
    tl.store(mine + units[:, None] * WIDTH + feats[None, :], dw1)
    tl.store(mine + HIDDEN_CHUNK * WIDTH + feats[:, None] * HIDDEN_CHUNK + units[None, :], dw2)
    tl.store(mine + 2 * HIDDEN_CHUNK * WIDTH + units, db1)
    tl.store(mine + 2 * HIDDEN_CHUNK * WIDTH + HIDDEN_CHUNK + feats, db2)
    if sum_slots_in_order(ws_ptr, counters_ptr, index, programs, reduce_group, slot, 1024):
        total = ws_ptr + tl.cast(programs + tl.cdiv(programs, reduce_group), tl.int64) * slot
        count = tl.minimum(HIDDEN_CHUNK, F - c0)
        _write_unpadded(total, dw1_ptr + c0 * stride_dw1n, count, F, stride_dw1n, stride_dw1k, WIDTH)
        _write_unpadded(total + HIDDEN_CHUNK * WIDTH, dw2_ptr + c0 * stride_dw2k, F, count, stride_dw2n,
                        stride_dw2k, HIDDEN_CHUNK)
        _write_unpadded(total + 2 * HIDDEN_CHUNK * WIDTH, db1_ptr + c0, 1, count, 0, 1, HIDDEN_CHUNK)
        if chunk == 0:
            _write_unpadded(total + 2 * HIDDEN_CHUNK * WIDTH + HIDDEN_CHUNK, db2_ptr, 1, F, 0, 1, WIDTH)


@triton.jit
def _write_unpadded(src_ptr, dst_ptr, rows, cols, stride_r, stride_c, SRC_COLUMNS: tl.constexpr):
    """``dst[r, c] = src[r * SRC_COLUMNS + c]`` for the ``rows x cols`` corner of a padded fp32 block, cast to
    ``dst``'s dtype; element by element in flat chunks (no tile-shaped masks live across the kernel's main loop)."""
    offs = tl.arange(0, 1024)
    for start in range(0, rows * cols, 1024):
        i = start + offs
        r = i // cols
        c = i % cols
        value = tl.load(src_ptr + r * SRC_COLUMNS + c, mask=i < rows * cols, other=0.0)
        tl.store(dst_ptr + r * stride_r + c * stride_c, value.to(dst_ptr.dtype.element_ty), mask=i < rows * cols)
