"""Whole residual block in one kernel, for widths whose weights fit on chip: forward and fused backward.

Forward, per tile of BLOCK_M rows (a program per tile, or a persistent grid whose programs load the weights once
and loop over tiles: an autotune choice) (``F`` = in = out features, padded to WIDTH, a power of two >= 16; the pad is
masked to zero on load, never copied):

    h   = relu(x W1^T + b1)               fp32 accumulator, rounded to the input dtype (as the two-GEMM path)
    out = relu(h W2^T + b2 + x)           the x tile already on chip is the residual
    x read once, out written once; h written only when STORE_H (training), else it never leaves the chip.
    Both weights are read once per program from L2 (they are at most 2 * 128 * 128 elements).

Backward, a persistent grid of P programs, each looping over row tiles with the weights on chip:

    g2  = dout * (out > 0)                aten's ReLU-backward rule: 0 where out <= 0
    g1  = (g2 W2) * (h > 0)
    dx  = g1 W1 + g2                      (NEED_DX)
    dW2 += g2^T h,  dW1 += g1^T x,  db2 += sum g2,  db1 += sum g1      (NEED_WEIGHTS, fp32, in registers)
    At the end program p writes its partial sums to slice p of fp32 workspaces; the host adds the P slices in a
    fixed order: deterministic, no atomics.

Shapes: x, out, h, dout, dx (M, F) with any strides; W1, W2 (F, F); b1, b2 (F,). Offsets: int64 tile origins,
int32 inside a tile.
Grids: forward ``(cdiv(M, BLOCK_M),)`` or ``(min(tiles, PROGRAMS_PER_SM * SMs),)``; backward ``(P,)`` with
``P = min(tiles, 2 * SMs)``.
FLOPs: forward ``4 M F^2``; backward ``4 M F^2`` for dx, ``+ 4 M F^2`` for the weight gradients.
Bytes: forward ``2 M F`` elements (``3 M F`` with h); backward ``M F * (3 + [dx] + [x])`` elements plus
``P * 2 (F^2 + F)`` fp32 partials, against ~13 passes of ``M F`` for the two-GEMM backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import input_precision, launch_device, multiprocessors, next_power_of_2, on_interpreter

# Forward: (BLOCK_M, num_warps, programs per SM), 0 programs per SM meaning one program per row tile, else a
# persistent grid that loads the weights once per program: the autotuner measures which pays. Backward:
# (BLOCK_M, num_warps). num_stages is irrelevant (no K loop). Every choice is compiled ahead of time for sm_90
# and sm_80 in tests/test_kernels_aot.py, whose register reports decided them.
FORWARD_CONFIGS = [(64, 4, 0), (128, 4, 0), (128, 8, 0), (64, 4, 2), (128, 8, 2)]
INTERPRETER_BLOCK_M = 32

# Widest padded feature count each kernel takes. Forward, by element size: shared memory for both weights and
# two tiles. Backward, by architecture: the fp32 weight-gradient accumulators and five tiles spill registers at
# width 64 on sm_80 in every configuration tried, not on sm_90.
MAX_FORWARD_WIDTH = {2: 128, 4: 64}
MAX_BACKWARD_WIDTH_HOPPER, MAX_BACKWARD_WIDTH_OLDER = 64, 32


def padded_width(features: int) -> int:
    return max(16, next_power_of_2(features))


def forward_shared_bytes(width: int, block_m: int, element_size: int) -> int:
    """Upper bound of the forward's shared memory: x, h and both weight tiles as dot operands."""
    return (2 * block_m * width + 2 * width * width) * element_size


def forward_configs(width: int) -> list[tuple[int, int, int]]:
    """Forward candidates at a padded width: 128 rows on 4 warps spill from width 32 up, and persistent
    programs (weights live across tiles) at width 128."""
    configs = FORWARD_CONFIGS if width <= 16 else [c for c in FORWARD_CONFIGS if c[:2] != (128, 4)]
    return configs if width <= 64 else [c for c in configs if c[2] == 0]


def max_backward_width(capability: tuple[int, int]) -> int:
    return MAX_BACKWARD_WIDTH_HOPPER if capability[0] >= 9 else MAX_BACKWARD_WIDTH_OLDER


def backward_config(width: int, element_size: int) -> tuple[int, int]:
    """The backward's fixed choice (its workspace size depends on the tile count, so it is not autotuned)."""
    return (64, 8) if element_size == 2 or width <= 16 else (32, 8)


def _prune(configs, named_args, **kwargs):
    allowed = set(forward_configs({**named_args, **kwargs}["WIDTH"]))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["PROGRAMS_PER_SM"]) in allowed]


@triton.jit
def _forward_tile(tile, x_ptr, out_ptr, h_ptr, w1t, w2t, b1, b2, M, F,
                  stride_xm, stride_xf, stride_om, stride_of, stride_hm, stride_hf,
                  HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  WIDTH: tl.constexpr, BLOCK_M: tl.constexpr):
    """One row tile of the block, the weights already on chip."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    row0 = tl.cast(tile, tl.int64) * BLOCK_M
    tile_mask = (rows < M - row0)[:, None] & (feats < F)[None, :]
    x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                mask=tile_mask, other=0.0)
    acc = tl.dot(x, w1t, input_precision=INPUT_PRECISION)
    if HAS_B1:
        acc += b1[None, :]
    # Padded columns are 0 * x, NaN where x is infinite: zero them so they cannot reach the real ones.
    h = tl.where((acc < 0) | (feats >= F)[None, :], 0.0, acc).to(x.dtype)
    if STORE_H:
        tl.store(h_ptr + row0 * stride_hm + (rows[:, None] * stride_hm + feats[None, :] * stride_hf), h,
                 mask=tile_mask)
    acc = tl.dot(h, w2t, input_precision=INPUT_PRECISION) + x.to(tl.float32)
    if HAS_B2:
        acc += b2[None, :]
    out = tl.where(acc < 0, 0.0, acc)
    tl.store(out_ptr + row0 * stride_om + (rows[:, None] * stride_om + feats[None, :] * stride_of),
             out.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def whole_block_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, h_ptr,
    M, F,
    stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
    stride_om, stride_of, stride_hm, stride_hf,
    M_BUCKET,  # autotune key only
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_H: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # 0: a program per tile; else a persistent grid of this many per SM
):
    feats = tl.arange(0, WIDTH)
    mask_f = feats < F
    weight_mask = mask_f[:, None] & mask_f[None, :]
    # Both weights as W^T tiles (element (k, n) = W[n, k]) and both biases, once per program.
    w1t = tl.load(w1_ptr + feats[:, None] * stride_w1k + feats[None, :] * stride_w1n, mask=weight_mask, other=0.0)
    w2t = tl.load(w2_ptr + feats[:, None] * stride_w2k + feats[None, :] * stride_w2n, mask=weight_mask, other=0.0)
    b1 = tl.load(b1_ptr + feats, mask=mask_f & HAS_B1, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + feats, mask=mask_f & HAS_B2, other=0.0).to(tl.float32)
    if PROGRAMS_PER_SM == 0:
        _forward_tile(tl.program_id(0), x_ptr, out_ptr, h_ptr, w1t, w2t, b1, b2, M, F,
                      stride_xm, stride_xf, stride_om, stride_of, stride_hm, stride_hf,
                      HAS_B1, HAS_B2, STORE_H, INPUT_PRECISION, WIDTH, BLOCK_M)
    else:
        for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            _forward_tile(tile, x_ptr, out_ptr, h_ptr, w1t, w2t, b1, b2, M, F,
                          stride_xm, stride_xf, stride_om, stride_of, stride_hm, stride_hf,
                          HAS_B1, HAS_B2, STORE_H, INPUT_PRECISION, WIDTH, BLOCK_M)


whole_block_forward_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "PROGRAMS_PER_SM": p}, num_warps=w, num_stages=1)
             for m, w, p in FORWARD_CONFIGS],
    key=["M_BUCKET", "F", "HAS_B1", "HAS_B2", "STORE_H", "INPUT_PRECISION", "WIDTH"],
    prune_configs_by={"early_config_prune": _prune},
)(whole_block_forward_kernel)


@triton.jit
def whole_block_backward_kernel(
    dout_ptr, out_ptr, h_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, dw2_ptr, db1_ptr, db2_ptr,
    M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_hm, stride_hf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    mask_f = feats < F
    weight_mask = mask_f[:, None] & mask_f[None, :]
    # Both weights as they are stored, (n, k): g2 @ W2 and g1 @ W1 read them untransposed.
    w1 = tl.load(w1_ptr + feats[:, None] * stride_w1n + feats[None, :] * stride_w1k, mask=weight_mask, other=0.0)
    w2 = tl.load(w2_ptr + feats[:, None] * stride_w2n + feats[None, :] * stride_w2k, mask=weight_mask, other=0.0)

    dw1 = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
    dw2 = tl.zeros((WIDTH, WIDTH), dtype=tl.float32)
    db1 = tl.zeros((WIDTH,), dtype=tl.float32)
    db2 = tl.zeros((WIDTH,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        tile_mask = (rows < M - row0)[:, None] & mask_f[None, :]
        inner_m = rows[:, None]
        dout = tl.load(dout_ptr + row0 * stride_dm + (inner_m * stride_dm + feats[None, :] * stride_df),
                       mask=tile_mask, other=0.0)
        out = tl.load(out_ptr + row0 * stride_om + (inner_m * stride_om + feats[None, :] * stride_of),
                      mask=tile_mask, other=0.0)
        h = tl.load(h_ptr + row0 * stride_hm + (inner_m * stride_hm + feats[None, :] * stride_hf),
                    mask=tile_mask, other=0.0)
        g2 = tl.where(out <= 0, 0.0, dout)
        g1 = tl.dot(g2, w2, input_precision=INPUT_PRECISION)
        g1 = tl.where(h <= 0, 0.0, g1).to(g2.dtype)
        if NEED_DX:
            dx = tl.dot(g1, w1, input_precision=INPUT_PRECISION) + g2.to(tl.float32)
            tl.store(dx_ptr + row0 * stride_dxm + (inner_m * stride_dxm + feats[None, :] * stride_dxf),
                     dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_WEIGHTS:
            x = tl.load(x_ptr + row0 * stride_xm + (inner_m * stride_xm + feats[None, :] * stride_xf),
                        mask=tile_mask, other=0.0)
            dw2 = tl.dot(tl.trans(g2), h, dw2, input_precision=INPUT_PRECISION)
            dw1 = tl.dot(tl.trans(g1), x, dw1, input_precision=INPUT_PRECISION)
            db2 += tl.sum(g2.to(tl.float32), axis=0)
            db1 += tl.sum(g1.to(tl.float32), axis=0)
    if NEED_WEIGHTS:
        square = tl.cast(pid, tl.int64) * WIDTH * WIDTH + feats[:, None] * WIDTH + feats[None, :]
        tl.store(dw1_ptr + square, dw1)
        tl.store(dw2_ptr + square, dw2)
        tl.store(db1_ptr + tl.cast(pid, tl.int64) * WIDTH + feats, db1)
        tl.store(db2_ptr + tl.cast(pid, tl.int64) * WIDTH + feats, db2)


def forward(x, w1, b1, w2, b2, *, store_h: bool, out=None, h=None, config: tuple[int, int, int] | None = None):
    """``(out, h or None)`` of the identity-shortcut block for 2-D ``x`` of width ``F <= MAX_FORWARD_WIDTH``.

    ``out`` / ``h`` may be given (any strides), else they are allocated row-major.
    """
    M, F = x.shape
    width = padded_width(F)
    if out is None:
        out = torch.empty((M, F), device=x.device, dtype=x.dtype)
    if store_h and h is None:
        h = torch.empty((M, F), device=x.device, dtype=x.dtype)
    if M == 0:
        return out, h
    h_arg = h if h is not None else out
    args = (x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, h_arg, M, F,
            *x.stride(), *w1.stride(), *w2.stride(), *out.stride(), *h_arg.stride(), next_power_of_2(M))
    flags = {"HAS_B1": b1 is not None, "HAS_B2": b2 is not None, "STORE_H": store_h,
             "INPUT_PRECISION": input_precision(x), "WIDTH": width}
    if config is None and on_interpreter(x.device):
        config = (INTERPRETER_BLOCK_M, 4, 0)
    sms = multiprocessors(x.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)

    with launch_device(x.device):
        if config is None:
            whole_block_forward_autotuned[grid](*args, **flags)
        else:
            block_m, warps, per_sm = config
            meta = {"BLOCK_M": block_m, "PROGRAMS_PER_SM": per_sm}
            whole_block_forward_kernel[grid(meta)](*args, **flags, **meta, num_warps=warps, num_stages=1)
    return out, h


def _programs(device: torch.device, tiles: int) -> int:
    return max(1, min(tiles, 2 * multiprocessors(device)))


def backward(dout, out, h, x, w1, w2, *, need_dx: bool, need_weights: bool, dx=None,
             config: tuple[int, int] | None = None):
    """``(dx, dW1, db1, dW2, db2)`` (None where not asked) of the identity-shortcut block, fp32 weight grads
    summed over the persistent programs in a fixed order, then cast to the weights' dtype."""
    M, F = out.shape
    width = padded_width(F)
    if config is None:
        config = (INTERPRETER_BLOCK_M, 4) if on_interpreter(out.device) else backward_config(width, out.element_size())
    block_m, warps = config
    programs = _programs(out.device, triton.cdiv(M, block_m))
    if need_dx and dx is None:
        dx = torch.empty((M, F), device=out.device, dtype=out.dtype)
    f32 = {"device": out.device, "dtype": torch.float32}
    slices = programs if need_weights else 1
    dw1, dw2 = torch.empty((slices, width, width), **f32), torch.empty((slices, width, width), **f32)
    db1, db2 = torch.empty((slices, width), **f32), torch.empty((slices, width), **f32)
    if M > 0:
        dx_arg = dx if dx is not None else out
        x_arg = x if x is not None else out
        with launch_device(out.device):
            whole_block_backward_kernel[(programs,)](
                dout, out, h, x_arg, w1, w2, dx_arg, dw1, dw2, db1, db2, M, F,
                *dout.stride(), *out.stride(), *h.stride(), *x_arg.stride(), *w1.stride(), *w2.stride(),
                *dx_arg.stride(),
                NEED_DX=need_dx, NEED_WEIGHTS=need_weights, INPUT_PRECISION=input_precision(out),
                WIDTH=width, BLOCK_M=block_m, num_warps=warps, num_stages=1,
            )
    if not need_weights:
        return dx, None, None, None, None
    if M == 0:
        for t in (dw1, dw2, db1, db2):
            t.zero_()
    dtype = w1.dtype
    # Fixed-order sums over the programs' slices, of the unpadded part only: contiguous results.
    return (dx, dw1[:, :F, :F].sum(0).to(dtype), db1[:, :F].sum(0).to(dtype),
            dw2[:, :F, :F].sum(0).to(dtype), db2[:, :F].sum(0).to(dtype))

