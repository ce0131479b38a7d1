"""Whole residual block in one kernel, for widths whose weights fit on chip: forward and fused backward.

The block ``out = final(act(x W1^T + b1) W2^T + b2 + x)``, ``act`` one of ``kernels/activations.py`` and
``final`` ReLU (the seed block) or nothing (the FFN form), both constexprs. The backend runs these kernels with
``act`` = ReLU only: the smooth activations compute right here but spill registers in the backward beyond width 16
and in the forward at width 128 on sm_80, so they are not compiled ahead of time and take the two-GEMM kernels.

Forward, per tile of BLOCK_M rows (a program per tile, or a persistent grid whose programs load the weights once
and loop over tiles: an autotune choice) (``F`` = in = hidden = out features, padded to WIDTH, a power of two
>= 16; the pad is masked to zero on load, never copied):

    pre = x W1^T + b1                     fp32 accumulator; x read once in its own dtype, rounded on chip for the
                                          dot where it is wider than the weights (autocast)
    h   = act(pre)                        rounded to the weights' dtype (as the two-GEMM path)
    out = final(h W2^T + b2 + x)          the x tile already on chip is the residual, added un-rounded
    x read once, out written once (in out's dtype); with STORE_SAVED (training) the saved tensor is written too:
    h for ReLU, pre for the others (``activations.saved_of``); else h never leaves the chip.
    Both weights are read once per program from L2 (they are at most 2 * 128 * 128 elements).

Backward, a persistent grid of P programs, each looping over row tiles with the weights on chip:

    g2  = dout * (out > 0)                aten's ReLU-backward rule: 0 where out <= 0 (FINAL_RELU; else g2 = dout)
    g1  = (g2 W2) * act'(saved)           ReLU: 0 where h <= 0
    dx  = g1 W1 + g2                      (NEED_DX; g2 added un-rounded, dx stored in dx's dtype)
    dW2 += g2^T act(saved),  dW1 += g1^T x,  db2 += sum g2,  db1 += sum g1   (NEED_WEIGHTS, fp32, in registers)
    At the end program p writes its partial sums to slot p of an fp32 workspace; the last program to arrive sums
    the slots in slot order (two levels, ``_reduce.py``) and writes dW1, db1, dW2, db2 in the weights' dtype:
    deterministic, no float atomics, no further launch.

Shapes: x, out, saved, dout, dx (M, F) with any strides; W1, W2 (F, F); b1, b2 (F,); gradients as the weights.
Offsets: int64 tile origins, int32 inside a tile.
Grids: forward ``(cdiv(M, BLOCK_M),)`` or ``(min(tiles, PROGRAMS_PER_SM * SMs),)``; backward ``(P,)`` with
``P = min(tiles, 2 * SMs)``.
FLOPs: forward ``4 M F^2``; backward ``4 M F^2`` for dx, ``+ 4 M F^2`` for the weight gradients.
Bytes: forward ``2 M F`` elements (``3 M F`` with the saved tensor); backward ``M F * (3 + [dx] + [x])``
elements (``- 1`` without a final ReLU: no out) plus ``~(P + 2 sqrt(P)) * 2 (F^2 + F)`` fp32 partials written and
read once, against ~13 passes of ``M F`` for the two-GEMM backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _reduce
from ._cast import narrowed
from ._common import input_precision, launch_device, multiprocessors, next_power_of_2, on_interpreter
from ._launch import CachedLauncher
from ._reduce import sum_slots_in_order
from .activations import apply, gradient, output_from_saved, saved_of

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


def max_forward_width(element_size: int, x_element_size: int | None = None) -> int:
    """Widest padded width the forward takes with weights of ``element_size`` bytes and ``x`` of
    ``x_element_size`` (wider under autocast). The same for both: an fp32 ``x`` narrows only the configs
    (``forward_configs``), which the ahead-of-time compiles check at every width."""
    return MAX_FORWARD_WIDTH[element_size]


def forward_shared_bytes(width: int, block_m: int, element_size: int, x_element_size: int | None = None) -> int:
    """Upper bound of the forward's shared memory: x, h and both weight tiles as dot operands (x in its own
    dtype and as the rounded dot operand when it is wider than the weights)."""
    x_extra = max(0, (x_element_size or element_size) - element_size)
    return (2 * block_m * width + 2 * width * width) * element_size + block_m * width * x_extra


def forward_configs(width: int, wide_x: bool = False) -> list[tuple[int, int, int]]:
    """Forward candidates at a padded width: 128 rows on 4 warps spill from width 32 up, and persistent
    programs (weights live across tiles) at width 128. ``wide_x``: x wider than the weights (autocast)."""
    configs = FORWARD_CONFIGS if width <= 16 else [c for c in FORWARD_CONFIGS if c[:2] != (128, 4)]
    if width > 64:  # and an fp32 x tile spills 64 rows on 4 warps (sm_80, 96 bytes)
        configs = [c for c in configs if c[2] == 0 and not (wide_x and c[:2] == (64, 4))]
    return configs


def max_backward_width(capability: tuple[int, int]) -> int:
    return MAX_BACKWARD_WIDTH_HOPPER if capability[0] >= 9 else MAX_BACKWARD_WIDTH_OLDER


def backward_config(width: int, element_size: int, wide: bool = False) -> tuple[int, int]:
    """The backward's fixed choice (its workspace size depends on the tile count, so it is not autotuned).
    ``wide``: x and dx in fp32 next to 16-bit weights (autocast): 64-row tiles spill at width 64 on sm_90 (8-52
    bytes), and 32-row ones lose wgmma below it. (A wider ``dout`` spills more: ``takes_dout`` refuses it.)"""
    if wide:
        return (32, 8) if width >= 64 else (64, 8)
    return (64, 8) if element_size == 2 or width <= 16 else (32, 8)


def takes_dout(dout_element_size: int, element_size: int) -> bool:
    """Whether the backward takes a ``dout`` of this size with weights of ``element_size``: not a wider one (the
    FFN form under autocast, whose output is fp32), which spills registers."""
    return dout_element_size <= element_size


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    allowed = set(forward_configs(args["WIDTH"], args["x_ptr"].element_size() > args["w1_ptr"].element_size()))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["PROGRAMS_PER_SM"]) in allowed]


@triton.jit
def _forward_tile(tile, x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                  stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                  HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr, ACTIVATION: tl.constexpr,
                  FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr,
                  BLOCK_M: tl.constexpr):
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
                 saved_of(pre.to(w2t.dtype), h, ACTIVATION), mask=tile_mask)
    acc = tl.dot(h, w2t, input_precision=INPUT_PRECISION) + x.to(tl.float32)
    if HAS_B2:
        acc += b2[None, :]
    if FINAL_RELU:
        acc = apply(acc, "relu")
    tl.store(out_ptr + row0 * stride_om + (rows[:, None] * stride_om + feats[None, :] * stride_of),
             acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def whole_block_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr,
    M, F,
    stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
    stride_om, stride_of, stride_sm, stride_sf,
    M_BUCKET,  # autotune key only
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr, ACTIVATION: tl.constexpr,
    FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
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
        _forward_tile(tl.program_id(0), x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                      stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                      HAS_B1, HAS_B2, STORE_SAVED, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)
    else:
        for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            _forward_tile(tile, x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                          stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                          HAS_B1, HAS_B2, STORE_SAVED, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)


whole_block_forward_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "PROGRAMS_PER_SM": p}, num_warps=w, num_stages=1)
             for m, w, p in FORWARD_CONFIGS],
    key=["M_BUCKET", "F", "HAS_B1", "HAS_B2", "STORE_SAVED", "ACTIVATION", "FINAL_RELU", "INPUT_PRECISION", "WIDTH"],
    prune_configs_by={"early_config_prune": _prune},
)(whole_block_forward_kernel)
_launch_forward_tuned = CachedLauncher(whole_block_forward_autotuned)
_launch_forward_fixed = CachedLauncher(whole_block_forward_kernel)


@triton.jit
def whole_block_backward_kernel(
    dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    ws_ptr, counters_ptr,
    M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k,
    reduce_group,  # programs per group of the in-kernel weight-gradient reduction (see _reduce.py)
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
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
        g2 = tl.load(dout_ptr + row0 * stride_dm + (inner_m * stride_dm + feats[None, :] * stride_df),
                     mask=tile_mask, other=0.0)
        if FINAL_RELU:
            out = tl.load(out_ptr + row0 * stride_om + (inner_m * stride_om + feats[None, :] * stride_of),
                          mask=tile_mask, other=0.0)
            g2 = tl.where(out <= 0, 0.0, g2)
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
            x = tl.load(x_ptr + row0 * stride_xm + (inner_m * stride_xm + feats[None, :] * stride_xf),
                        mask=tile_mask, other=0.0)
            h = output_from_saved(saved, ACTIVATION)
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
def _write_unpadded(src_ptr, dst_ptr, rows, cols, stride_r, stride_c, WIDTH: tl.constexpr):
    """``dst[r, c] = src[r * WIDTH + c]`` for the ``rows x cols`` corner of a padded fp32 block, cast to ``dst``'s
    dtype; element by element in flat chunks (no tile-shaped masks live across the kernel's main loop)."""
    offs = tl.arange(0, 1024)
    for start in range(0, rows * cols, 1024):
        i = start + offs
        r = i // cols
        c = i % cols
        value = tl.load(src_ptr + r * WIDTH + c, mask=i < rows * cols, other=0.0)
        tl.store(dst_ptr + r * stride_r + c * stride_c, value.to(dst_ptr.dtype.element_ty), mask=i < rows * cols)


_launch_backward = CachedLauncher(whole_block_backward_kernel)


def forward(x, w1, b1, w2, b2, *, store_saved: bool, activation: str = "relu", final_relu: bool = True,
            out_dtype: torch.dtype | None = None, out=None, saved=None, config: tuple[int, int, int] | None = None):
    """``(out, saved or None)`` of the identity-shortcut block for 2-D ``x`` of width ``F <= MAX_FORWARD_WIDTH``.

    ``saved`` is what backward needs of the hidden layer (``activations.saved_of``), in the weights' dtype.
    ``out`` (default dtype ``out_dtype``, else ``x``'s) / ``saved`` may be given (any strides), else they are
    allocated row-major. ``x`` may be wider than the weights (autocast).
    """
    M, F = x.shape
    width = padded_width(F)
    if out is None:
        out = torch.empty((M, F), device=x.device, dtype=out_dtype or x.dtype)
    if store_saved and saved is None:
        saved = torch.empty((M, F), device=x.device, dtype=w1.dtype)
    if M == 0:
        return out, saved
    saved_arg = saved if saved is not None else out
    args = (x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, saved_arg, M, F,
            *x.stride(), *w1.stride(), *w2.stride(), *out.stride(), *saved_arg.stride(), next_power_of_2(M))
    flags = {"HAS_B1": b1 is not None, "HAS_B2": b2 is not None, "STORE_SAVED": store_saved,
             "ACTIVATION": activation, "FINAL_RELU": final_relu, "INPUT_PRECISION": input_precision(w1),
             "WIDTH": width}
    if config is None and on_interpreter(x.device):
        config = (INTERPRETER_BLOCK_M, 4, 0)
    sms = multiprocessors(x.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)

    with launch_device(x.device):
        if config is None:
            _launch_forward_tuned(grid, *args, **flags)
        else:
            block_m, warps, per_sm = config
            meta = {"BLOCK_M": block_m, "PROGRAMS_PER_SM": per_sm}
            _launch_forward_fixed(grid(meta), *args, **flags, **meta, num_warps=warps, num_stages=1)
    return out, saved


def _programs(device: torch.device, tiles: int) -> int:
    return max(1, min(tiles, 2 * multiprocessors(device)))


def backward(dout, out, saved, x, w1, w2, *, need_dx: bool, need_weights: bool, activation: str = "relu",
             final_relu: bool = True, dx_dtype: torch.dtype | None = None, dx=None,
             config: tuple[int, int] | None = None):
    """``(dx, dW1, db1, dW2, db2)`` (None where not asked) of the identity-shortcut block: one launch, the weight
    gradients summed over the persistent programs in slot order inside it and written in the weights' dtype.

    ``out`` is read only with ``final_relu`` (else it may be None); ``x`` only for the weight gradients. ``dout``
    and ``x`` may be wider than the weights (autocast); ``dx`` has ``dx_dtype`` (default ``dout``'s) or is given.
    """
    M, F = dout.shape
    width = padded_width(F)
    if config is None:
        wide = max(x.element_size() if x is not None else 0, torch.finfo(dx_dtype or dout.dtype).bits // 8) > \
            w1.element_size()
        config = ((INTERPRETER_BLOCK_M, 4) if on_interpreter(dout.device)
                  else backward_config(width, w1.element_size(), wide))
    block_m, warps = config
    programs = _programs(dout.device, triton.cdiv(M, block_m))
    if need_dx and dx is None:
        dx = torch.empty((M, F), device=dout.device, dtype=dx_dtype or dout.dtype)
    grads = [None] * 4
    ws = counters = dout
    if need_weights:
        if M == 0:  # nothing to sum: zero gradients (no launch for an empty batch)
            return dx, *(w1.new_zeros(shape) for shape in ((F, F), (F,), (F, F), (F,)))
        grads = [torch.empty(shape, device=w1.device, dtype=w1.dtype) for shape in ((F, F), (F,), (F, F), (F,))]
        ws = torch.empty((_reduce.workspace_slots(programs), 2 * width * width + 2 * width), device=dout.device,
                         dtype=torch.float32)
        counters = _reduce.arrival_counters(dout.device, _reduce.counters_needed(programs))
    if M > 0:
        dw1, db1, dw2, db2 = (g if g is not None else dout for g in grads)
        dx_arg = dx if dx is not None else dout
        x_arg = x if x is not None else dout
        out_arg = out if final_relu else dout
        with launch_device(dout.device):
            _launch_backward(
                (programs,),
                dout, out_arg, saved, x_arg, w1, w2, dx_arg, dw1, db1, dw2, db2, ws, counters, M, F,
                *dout.stride(), *out_arg.stride(), *saved.stride(), *x_arg.stride(), *w1.stride(), *w2.stride(),
                *dx_arg.stride(), *_matrix_strides(dw1), *_matrix_strides(dw2), _reduce.group_size(programs),
                NEED_DX=need_dx, NEED_WEIGHTS=need_weights, ACTIVATION=activation, FINAL_RELU=final_relu,
                INPUT_PRECISION=input_precision(w1), WIDTH=width, BLOCK_M=block_m, num_warps=warps, num_stages=1,
            )
    return dx, *grads


def _matrix_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, 0)
