"""Whole residual block in one kernel, forward and fused backward, h never written unless training needs it.

The block ``out = final(act(x W1^T + b1) W2^T + b2 + x)``, ``act`` one of ``kernels/activations.py`` and
``final`` ReLU (the reference block) or nothing (the FFN form), both constexprs. The backend runs these kernels with
``act`` = ReLU only: the smooth activations compute right here but spill registers in the backward beyond width 16
and in the forward at width 128 on sm_80, so they are not compiled ahead of time and take the two-GEMM kernels.
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

  x read once from memory, out written once (in out's dtype); with STORE_SAVED (training) the saved tensor is
  written too: h for ReLU, pre for the others (``activations.saved_of``); else h never leaves the chip. The
  weights are read from L2 once per program: ``2 F^2`` elements per tile when streamed (so larger tiles read
  less), at most ``2 * 128 * 128`` on chip.

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

- split by role (HIDDEN_CHUNK = C > 0, to MAX_BACKWARD_WIDTH_HOPPER): the accumulators of all of dW1 and dW2 do not
  fit in one program's registers, so programs form G groups of ``roles = S + F / C`` (S = DX_SHARE, ``dx_share``):
  S programs of a group compute dx as above (both weights on chip, no accumulators), and one program per chunk c
  of C hidden units computes, transposed so that every GEMM reads its operands as loaded,

    g1[:, c]^T = (W2[:, c]^T g2^T) * act'(saved[:, c]^T)
    dW2[:, c] += g2^T act(saved[:, c]),  dW1[c, :] += g1[:, c]^T x,  db1[c] += sum g1[:, c],  db2 += sum g2

  (g2 masked through the load's predicate) and the G programs of each chunk sum their partials as above, one
  reduction per chunk (chunk 0 writes db2). The programs of a group walk the same tiles, so dout, out, saved and
  x come from memory about once and from L2 for the other roles.

Shapes: x, out, saved, dout, dx (M, F) with any strides; W1, W2 (F, F); b1, b2 (F,); gradients as the weights.
Offsets: int64 tile origins, int32 inside a tile.
Grids: forward ``(cdiv(M, BLOCK_M),)`` or ``(min(tiles, PROGRAMS_PER_SM * SMs),)``; backward whole ``(P,)`` with
``P = min(tiles, 2 * SMs)``, split ``((S [NEED_DX] + F / C [NEED_WEIGHTS]) * G,)`` with ``G = max(1, P // (S + F /
C))``.
FLOPs: forward ``4 M F^2``; backward ``4 M F^2`` for dx, ``+ 4 M F^2`` for the weight gradients (split: ``+ 6 M
F^2``, g1 computed again by the weight programs).
Bytes: forward ``2 M F`` elements (``3 M F`` with the saved tensor); backward ``M F * (3 + [dx] + [x])``
elements (``- 1`` without a final ReLU: no out) plus ``~(P + 2 sqrt(P)) * 2 (F^2 + F)`` fp32 partials written and
read once (split: ``(G + 2 sqrt(G)) * (2 C F + C + F)`` per chunk), against ~13 passes of ``M F`` for the
two-GEMM backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _reduce
from ._cast import narrowed
from ._common import (
    capability,
    input_precision,
    launch_device,
    max_shared_memory,
    multiprocessors,
    next_power_of_2,
    on_interpreter,
)
from ._launch import CachedLauncher
from ._reduce import sum_slots_in_order
from .activations import apply, gradient, output_from_saved, saved_of


class ForwardConfig(NamedTuple):
    """One forward candidate: ``programs_per_sm`` 0 is a program per row tile, else a persistent grid that loads
    the weights once per program; ``hidden_chunk`` 0 keeps both weights on chip, else they stream from L2 that
    many hidden units at a time, software-pipelined ``stages`` deep."""

    block_m: int
    warps: int
    programs_per_sm: int = 0
    hidden_chunk: int = 0
    stages: int = 1


class BackwardConfig(NamedTuple):
    """The backward's tile and warps; ``hidden_chunk`` 0: every program computes everything (the weight
    gradients' accumulators whole in registers), else programs split by role (``_backward_by_role``)."""

    block_m: int
    warps: int
    hidden_chunk: int = 0


# Forward with both weights on chip: the autotuner measures which pays. Every candidate is compiled ahead of time
# for sm_90 and sm_80 in tests/test_kernels_aot.py (with triton 3.6 and 3.9), whose register reports decided them.
FORWARD_CONFIGS = [ForwardConfig(64, 4, 0), ForwardConfig(128, 4, 0), ForwardConfig(128, 8, 0),
                   ForwardConfig(64, 4, 2), ForwardConfig(128, 8, 2)]
# Forward with the weights streamed, keyed (sm_90 or later, element size). The fp32 accumulator of the output row
# tile (BLOCK_M x WIDTH) lives in registers across the hidden chunks: 8 warps; at width 256, 128 rows reach 230-254
# registers in 16-bit (no spill) and spill with an fp32 x (autocast: 292-660 bytes on sm_90) or on sm_80 (12
# bytes); 64 rows on 4 warps spill (sm_80: 128 bytes; sm_90: 0 bytes at 237-255 registers). Chunks of 64 hidden
# units need 172 KB of shared memory (sm_90, 3 stages would not fit), fp32 chunks of 32 spill at width 256.
STREAMED_CONFIGS = {
    (True, 2): [ForwardConfig(64, 8, 0, 32, 3), ForwardConfig(128, 8, 0, 32, 2)],
    (False, 2): [ForwardConfig(64, 8, 0, 32, 3)],
    (True, 4): [ForwardConfig(64, 8, 0, 16, 3)],
    (False, 4): [ForwardConfig(64, 8, 0, 16, 3)],
}
INTERPRETER_BLOCK_M = 32
INTERPRETER_HIDDEN_CHUNK = 32

# Widest padded feature count each kernel takes. Forward, by element size: both weights on chip up to
# WEIGHTS_ON_CHIP_WIDTH (shared memory for both and two tiles), streamed beyond. Backward, by architecture:
# whole accumulators in every program to MAX_BACKWARD_WIDTH_WHOLE (they and five tiles spill registers at width
# 64 on sm_80 in every configuration tried, not on sm_90), programs split by role beyond (sm_90 only: on sm_80 the
# split spills at width 128 on 4 warps and sits at 255 registers on 8, and fp32 needs 172 KB of shared memory).
WEIGHTS_ON_CHIP_WIDTH = {2: 128, 4: 64}
MAX_FORWARD_WIDTH = {2: 256, 4: 256}
MAX_BACKWARD_WIDTH_HOPPER, MAX_BACKWARD_WIDTH_OLDER = 128, 32
MAX_BACKWARD_WIDTH_WHOLE = 64


def padded_width(features: int) -> int:
    return max(16, next_power_of_2(features))


def max_forward_width(element_size: int, x_element_size: int | None = None) -> int:
    """Widest padded width the forward takes with weights of ``element_size`` bytes and ``x`` of
    ``x_element_size`` (wider under autocast). The same for both: an fp32 ``x`` narrows only the configs
    (``forward_configs``), which the ahead-of-time compiles check at every width."""
    return MAX_FORWARD_WIDTH[element_size]


def forward_shared_bytes(config: ForwardConfig, width: int, element_size: int, x_element_size: int | None = None,
                         capability: tuple[int, int] = (9, 0)) -> int:
    """Upper bound of the forward's shared memory with ``config`` (checked against the compiler's figure for every
    case compiled ahead of time): the x tile as a dot operand (in its own dtype and rounded when it is wider than
    the weights), then either h and both weights (on chip), or ``stages`` buffers (one fewer before sm_90) of a
    chunk of each weight and two h chunks (streamed)."""
    block_m, chunk, stages = config.block_m, config.hidden_chunk, config.stages
    x_bytes = block_m * width * (element_size + max(0, (x_element_size or element_size) - element_size))
    if chunk == 0:
        return x_bytes + (block_m * width + 2 * width * width) * element_size
    buffers = stages if capability[0] >= 9 else max(1, stages - 1)
    return x_bytes + (buffers * 2 * chunk * width + 2 * block_m * chunk) * element_size


def forward_configs(width: int, element_size: int, wide_x: bool = False,
                    capability: tuple[int, int] = (9, 0)) -> list[ForwardConfig]:
    """Forward candidates at a padded width for weights of ``element_size`` bytes on a device of ``capability``
    (before the shared-memory check, ``runnable_forward_configs``). On chip: 128 rows on 4 warps spill from width
    32 up, and persistent programs (weights live across tiles) at width 128. ``wide_x``: x wider than the weights
    (autocast)."""
    if width > MAX_FORWARD_WIDTH[element_size]:
        return []
    if width > WEIGHTS_ON_CHIP_WIDTH[element_size]:
        configs = STREAMED_CONFIGS[(capability[0] >= 9, element_size)]
        return [c for c in configs if not (wide_x and c.block_m > 64)]  # 128 rows spill with an fp32 x
    configs = FORWARD_CONFIGS if width <= 16 else [c for c in FORWARD_CONFIGS if c[:2] != (128, 4)]
    if width > 64:  # and an fp32 x tile spills 64 rows on 4 warps (sm_80, 96 bytes)
        configs = [c for c in configs if c.programs_per_sm == 0 and not (wide_x and c[:2] == (64, 4))]
    return configs


def runnable_forward_configs(width: int, element_size: int, x_element_size: int, capability: tuple[int, int],
                             shared_limit: int) -> list[ForwardConfig]:
    """The forward candidates that fit a device's shared memory per block (``shared_limit`` bytes): the
    autotuner's prune and the backend's test of whether the whole block runs at all."""
    return [c for c in forward_configs(width, element_size, x_element_size > element_size, capability)
            if forward_shared_bytes(c, width, element_size, x_element_size, capability) <= shared_limit]


def max_backward_width(capability: tuple[int, int]) -> int:
    return MAX_BACKWARD_WIDTH_HOPPER if capability[0] >= 9 else MAX_BACKWARD_WIDTH_OLDER


def backward_config(width: int, element_size: int, wide: bool = False) -> BackwardConfig:
    """The backward's fixed choice (its workspace size depends on the tile count, so it is not autotuned).
    ``wide``: x and dx in fp32 next to 16-bit weights (autocast): 64-row tiles spill at width 64 on sm_90 (8-52
    bytes), and 32-row ones lose wgmma below it. (A wider ``dout`` spills more: ``takes_dout`` refuses it.)
    Beyond MAX_BACKWARD_WIDTH_WHOLE, roles with chunks of 32 hidden units: 16-bit 64 rows on 8 warps (212-222
    registers on sm_90; 4 warps spill with an fp32 x), fp32 32 rows (127; 64 rows sit at 255)."""
    if width > MAX_BACKWARD_WIDTH_WHOLE:
        return BackwardConfig(64 if element_size == 2 else 32, 8, 32)
    if wide:
        return BackwardConfig(32, 8) if width >= 64 else BackwardConfig(64, 8)
    return BackwardConfig(64, 8) if element_size == 2 or width <= 16 else BackwardConfig(32, 8)


def dx_share(width: int, hidden_chunk: int) -> int:
    """dx programs per group of the role split: dx's ``4 F^2`` FLOPs per row over a weight chunk's ``6 F chunk``."""
    return max(1, round(2 * width / (3 * hidden_chunk)))


def takes_dout(dout_element_size: int, element_size: int) -> bool:
    """Whether the backward takes a ``dout`` of this size with weights of ``element_size``: not a wider one (the
    FFN form under autocast, whose output is fp32), which spills registers."""
    return dout_element_size <= element_size


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune, before anything compiles: the candidates this width, these dtypes and this
    device run (``runnable_forward_configs``)."""
    args = {**named_args, **kwargs}
    x, w1 = args["x_ptr"], args["w1_ptr"]
    allowed = set(runnable_forward_configs(args["WIDTH"], w1.element_size(), x.element_size(),
                                           capability(x.device), max_shared_memory(x.device)))
    return [c for c in configs if _config_of(c) in allowed]


def _config_of(c: triton.Config) -> ForwardConfig:
    return ForwardConfig(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["PROGRAMS_PER_SM"], c.kwargs["HIDDEN_CHUNK"],
                         c.num_stages)


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
def _forward_tile_streamed(tile, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr, M, F,
                           stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
                           stride_om, stride_of, stride_sm, stride_sf,
                           HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, STORE_SAVED: tl.constexpr,
                           ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                           WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, HIDDEN_CHUNK: tl.constexpr):
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
                     saved_of(pre.to(w2t.dtype), h, ACTIVATION), mask=mask_m[:, None] & mask_h[None, :])
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
    HIDDEN_CHUNK: tl.constexpr,  # 0: both weights on chip; else streamed from L2 this many hidden units at a time
):
    if HIDDEN_CHUNK > 0:
        _forward_tile_streamed(tl.program_id(0), x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, saved_ptr, M, F,
                               stride_xm, stride_xf, stride_w1n, stride_w1k, stride_w2n, stride_w2k,
                               stride_om, stride_of, stride_sm, stride_sf, HAS_B1, HAS_B2, STORE_SAVED, ACTIVATION,
                               FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M, HIDDEN_CHUNK)
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
                          HAS_B1, HAS_B2, STORE_SAVED, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)
        else:
            for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
                _forward_tile(tile, x_ptr, out_ptr, saved_ptr, w1t, w2t, b1, b2, M, F,
                              stride_xm, stride_xf, stride_om, stride_of, stride_sm, stride_sf,
                              HAS_B1, HAS_B2, STORE_SAVED, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)


_ALL_FORWARD_CONFIGS = list(dict.fromkeys(FORWARD_CONFIGS + [c for cs in STREAMED_CONFIGS.values() for c in cs]))
whole_block_forward_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c.block_m, "PROGRAMS_PER_SM": c.programs_per_sm,
                            "HIDDEN_CHUNK": c.hidden_chunk}, num_warps=c.warps, num_stages=c.stages)
             for c in _ALL_FORWARD_CONFIGS],
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
    HIDDEN_CHUNK: tl.constexpr,  # 0: every program computes everything; else programs split by role (see above)
    DX_SHARE: tl.constexpr,  # with HIDDEN_CHUNK: programs computing dx per group (see _backward_by_role)
):
    if HIDDEN_CHUNK > 0:
        _backward_by_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                          db2_ptr, ws_ptr, counters_ptr, M, F,
                          stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                          stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                          stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
                          NEED_DX, NEED_WEIGHTS, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M,
                          HIDDEN_CHUNK, DX_SHARE)
    else:
        _backward_whole(dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr,
                        db2_ptr, ws_ptr, counters_ptr, M, F,
                        stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                        stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                        stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
                        NEED_DX, NEED_WEIGHTS, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)


@triton.jit
def _backward_whole(
    dout_ptr, out_ptr, saved_ptr, x_ptr, w1_ptr, w2_ptr, dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    ws_ptr, counters_ptr, M, F,
    stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
    stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
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
def _masked_dout(dout_ptr, out_ptr, i, j, mask, stride_di, stride_dj, stride_oi, stride_oj, FINAL_RELU: tl.constexpr):
    """The block ``g2[i, j] = dout[i, j] * (out[i, j] > 0)`` (aten's rule: 0 where out <= 0; ``dout`` itself without
    a final ReLU), from pointers already at the tile's origin; the strides decide which of i, j are rows."""
    if FINAL_RELU:  # as the load's predicate: g2 stays a plain load, which the GEMMs read without a copy each
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
    NEED_DX: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, HIDDEN_CHUNK: tl.constexpr,
    DX_SHARE: tl.constexpr,
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
                _dx_role(dout_ptr, out_ptr, saved_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, group * dx_share + role,
                         groups * dx_share, stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf,
                         stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                         ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)
            else:
                _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                              ws_ptr, counters_ptr, M, F, role - dx_share, group, groups,
                              stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm,
                              stride_xf, stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n,
                              stride_dw2k, reduce_group, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M,
                              HIDDEN_CHUNK)
        else:
            _dx_role(dout_ptr, out_ptr, saved_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, pid, tl.num_programs(0),
                     stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf,
                     stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
                     ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M)
    else:
        _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                      ws_ptr, counters_ptr, M, F, role, group, groups,
                      stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm,
                      stride_xf, stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n,
                      stride_dw2k, reduce_group, ACTIVATION, FINAL_RELU, INPUT_PRECISION, WIDTH, BLOCK_M,
                      HIDDEN_CHUNK)


@triton.jit
def _dx_role(dout_ptr, out_ptr, saved_ptr, w1_ptr, w2_ptr, dx_ptr, M, F, index, programs,
             stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf,
             stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_dxm, stride_dxf,
             ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             WIDTH: tl.constexpr, BLOCK_M: tl.constexpr):
    """``dx = ((g2 W2) * act'(saved)) W1 + g2`` on tiles ``index, index + programs, ...``, both weights on chip."""
    rows = tl.arange(0, BLOCK_M)
    feats = tl.arange(0, WIDTH)
    mask_f = feats < F
    weight_mask = mask_f[:, None] & mask_f[None, :]
    w1 = tl.load(w1_ptr + feats[:, None] * stride_w1n + feats[None, :] * stride_w1k, mask=weight_mask, other=0.0)
    w2 = tl.load(w2_ptr + feats[:, None] * stride_w2n + feats[None, :] * stride_w2k, mask=weight_mask, other=0.0)
    for tile in range(index, tl.cdiv(M, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        tile_mask = (rows < M - row0)[:, None] & mask_f[None, :]
        g2 = _masked_dout(dout_ptr + row0 * stride_dm, out_ptr + row0 * stride_om, rows, feats, tile_mask,
                          stride_dm, stride_df, stride_om, stride_of, FINAL_RELU)
        saved = tl.load(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + feats[None, :] * stride_sf),
                        mask=tile_mask, other=0.0)
        g1 = tl.dot(narrowed(g2, w2), w2, input_precision=INPUT_PRECISION)
        g1 = gradient(g1, saved, ACTIVATION).to(w1.dtype)
        dx = tl.dot(g1, w1, input_precision=INPUT_PRECISION) + g2.to(tl.float32)
        tl.store(dx_ptr + row0 * stride_dxm + (rows[:, None] * stride_dxm + feats[None, :] * stride_dxf),
                 dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _weights_role(dout_ptr, out_ptr, saved_ptr, x_ptr, w2_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
                  ws_ptr, counters_ptr, M, F, chunk, index, programs,
                  stride_dm, stride_df, stride_om, stride_of, stride_sm, stride_sf, stride_xm, stride_xf,
                  stride_w2n, stride_w2k, stride_dw1n, stride_dw1k, stride_dw2n, stride_dw2k, reduce_group,
                  ACTIVATION: tl.constexpr, FINAL_RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, HIDDEN_CHUNK: tl.constexpr):
    """The weight gradients of hidden units ``c = chunk * HIDDEN_CHUNK ...`` on tiles ``index, index + programs,
    ...``, computed transposed so that every GEMM reads its operands as loaded (no transpose in registers):
    ``g1[:, c]^T = (W2[:, c]^T g2^T) * act'(saved[:, c]^T)``, ``dW2[:, c] += g2^T act(saved[:, c])``,
    ``dW1[c, :] += g1[:, c]^T x``, ``db1[c] += sum g1[:, c]``, ``db2 += sum g2``; then the chunk's programs sum
    their partials in slot order (one reduction per chunk; chunk 0 writes db2)."""
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
                                    FINAL_RELU), w2ct)
        saved_t = tl.load(saved_ptr + row0 * stride_sm + (hidden[:, None] * stride_sf + rows[None, :] * stride_sm),
                          mask=mask_h[:, None] & mask_m[None, :], other=0.0)
        saved = tl.load(saved_ptr + row0 * stride_sm + (rows[:, None] * stride_sm + hidden[None, :] * stride_sf),
                        mask=mask_m[:, None] & mask_h[None, :], other=0.0)
        x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + feats[None, :] * stride_xf),
                    mask=mask_m[:, None] & mask_f[None, :], other=0.0)
        g1t = tl.dot(w2ct, g2t, input_precision=INPUT_PRECISION)
        g1t = gradient(g1t, saved_t, ACTIVATION).to(w2ct.dtype)
        dw2 = tl.dot(g2t, output_from_saved(saved, ACTIVATION), dw2, input_precision=INPUT_PRECISION)
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


_launch_backward = CachedLauncher(whole_block_backward_kernel)


def forward(x, w1, b1, w2, b2, *, store_saved: bool, activation: str = "relu", final_relu: bool = True,
            out_dtype: torch.dtype | None = None, out=None, saved=None, config: tuple[int, ...] | None = None):
    """``(out, saved or None)`` of the identity-shortcut block for 2-D ``x`` of width ``F`` (padded, at most
    ``MAX_FORWARD_WIDTH``).

    ``saved`` is what backward needs of the hidden layer (``activations.saved_of``), in the weights' dtype.
    ``out`` (default dtype ``out_dtype``, else ``x``'s) / ``saved`` may be given (any strides), else they are
    allocated row-major. ``x`` may be wider than the weights (autocast). ``config`` (a ``ForwardConfig`` or its
    leading fields) skips the autotuner.
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
        streamed = width > WEIGHTS_ON_CHIP_WIDTH[w1.element_size()]
        config = ForwardConfig(INTERPRETER_BLOCK_M, 4, 0, INTERPRETER_HIDDEN_CHUNK if streamed else 0)
    sms = multiprocessors(x.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)

    with launch_device(x.device):
        if config is None:
            _launch_forward_tuned(grid, *args, **flags)
        else:
            config = ForwardConfig(*config)
            meta = {"BLOCK_M": config.block_m, "PROGRAMS_PER_SM": config.programs_per_sm,
                    "HIDDEN_CHUNK": config.hidden_chunk}
            _launch_forward_fixed(grid(meta), *args, **flags, **meta, num_warps=config.warps,
                                  num_stages=config.stages)
    return out, saved


def _programs(device: torch.device, tiles: int) -> int:
    """Programs of the persistent backward: two per SM, at most one per tile."""
    return max(1, min(tiles, 2 * multiprocessors(device)))


def backward(dout, out, saved, x, w1, w2, *, need_dx: bool, need_weights: bool, activation: str = "relu",
             final_relu: bool = True, dx_dtype: torch.dtype | None = None, dx=None,
             config: tuple[int, ...] | None = None):
    """``(dx, dW1, db1, dW2, db2)`` (None where not asked) of the identity-shortcut block: one launch, the weight
    gradients summed over the persistent programs in slot order inside it and written in the weights' dtype.

    ``out`` is read only with ``final_relu`` (else it may be None); ``x`` only for the weight gradients. ``dout``
    and ``x`` may be wider than the weights (autocast); ``dx`` has ``dx_dtype`` (default ``dout``'s) or is given.
    ``config``: a ``BackwardConfig`` (or its leading fields) instead of ``backward_config``'s.
    """
    M, F = dout.shape
    width = padded_width(F)
    if config is None:
        wide = max(x.element_size() if x is not None else 0, torch.finfo(dx_dtype or dout.dtype).bits // 8) > \
            w1.element_size()
        config = backward_config(width, w1.element_size(), wide)
        if on_interpreter(dout.device):
            config = config._replace(block_m=INTERPRETER_BLOCK_M, warps=4)
    block_m, warps, chunk = BackwardConfig(*config)
    programs = _programs(dout.device, triton.cdiv(M, block_m))
    # The weight gradients are summed in `reductions` independent reductions of `partials` slots each: one over
    # every program, or one per hidden chunk over that chunk's programs (one per group of roles). Their count does
    # not depend on need_dx: the same bits with or without dx.
    share = dx_share(width, chunk) if chunk else 1
    if chunk:
        partials = max(1, programs // (share + width // chunk))
        roles = share * need_dx + (width // chunk) * need_weights
        programs, reductions, slot = roles * partials, width // chunk, 2 * chunk * width + chunk + width
    else:
        partials, reductions, slot = programs, 1, 2 * width * width + 2 * width
    if need_dx and dx is None:
        dx = torch.empty((M, F), device=dout.device, dtype=dx_dtype or dout.dtype)
    grads = [None] * 4
    ws = counters = dout
    if need_weights:
        if M == 0:  # nothing to sum: zero gradients (no launch for an empty batch)
            return dx, *(w1.new_zeros(shape) for shape in ((F, F), (F,), (F, F), (F,)))
        grads = [torch.empty(shape, device=w1.device, dtype=w1.dtype) for shape in ((F, F), (F,), (F, F), (F,))]
        ws = torch.empty((reductions * _reduce.workspace_slots(partials), slot), device=dout.device,
                         dtype=torch.float32)
        counters = _reduce.arrival_counters(dout.device, reductions * _reduce.counters_needed(partials))
    if M > 0:
        dw1, db1, dw2, db2 = (g if g is not None else dout for g in grads)
        dx_arg = dx if dx is not None else dout
        x_arg = x if x is not None else dout
        out_arg = out if final_relu else dout
        with launch_device(dout.device), _reduce.reset_on_failure(counters if need_weights else None):
            _launch_backward(
                (programs,),
                dout, out_arg, saved, x_arg, w1, w2, dx_arg, dw1, db1, dw2, db2, ws, counters, M, F,
                *dout.stride(), *out_arg.stride(), *saved.stride(), *x_arg.stride(), *w1.stride(), *w2.stride(),
                *dx_arg.stride(), *_matrix_strides(dw1), *_matrix_strides(dw2), _reduce.group_size(partials),
                NEED_DX=need_dx, NEED_WEIGHTS=need_weights, ACTIVATION=activation, FINAL_RELU=final_relu,
                INPUT_PRECISION=input_precision(w1), WIDTH=width, BLOCK_M=block_m, HIDDEN_CHUNK=chunk,
                DX_SHARE=share, num_warps=warps, num_stages=1,
            )
    return dx, *grads


def _matrix_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, 0)
