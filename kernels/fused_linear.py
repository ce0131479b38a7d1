"""Fused linear: one tiled GEMM whose epilogue applies bias, residual, activation and activation-backward gates on the
fp32 accumulator, with ReLU-backward masks applied to its operands on load and split-K reduced inside the launch.

Math, per output element (all arithmetic in fp32, one rounding at the store):

    A'         = MASK "a" ? (Q <= 0 ? 0 : A) : A  (ReLU backward on load: A = dY, Q = Y, aten.threshold_backward's rule;
                                                    dY * (Y > 0) is never written to memory)
    B'         = act_B(B)                         (B_ACTIVATION: B = act(P) from a saved pre-activation P, on load)
    acc[m, n]  = sum_k A'[m, k] B'[k, n]
               + sum_k SA[m, k] SB[k, n]          (HAS_SECOND: a second operand pair joins along K, e.g. the
                                                    projection shortcut  x Ws^T  or  g2 Ws  in backward)
    acc       += bias[n]                          (HAS_BIAS)
    acc       += R'[m, n]                         (HAS_RESIDUAL; R' = Q <= 0 ? 0 : R with MASK "residual")
    acc        = act_G'(G[m, n]) * acc            (GATE: backward through activation G; for ReLU, G is its output
                                                    and acc = G <= 0 ? 0 : acc, the rule aten.threshold_backward uses)
    pre[m, n]  = acc                              (STORE_PRE: the pre-activation, saved for backward)
    C[m, n]    = act(acc)                         (ACTIVATION; ReLU keeps NaN, as torch.relu)
    rowsum[m]  = sum_k A'[m, k]                   (HAS_ROWSUM: with A = dY^T this is the bias gradient)

Activations (relu, gelu, gelu_tanh, silu, identity) come from ``kernels/activations.py`` by constexpr name.
Every layer of the residual block is one call: forward ``h = act(x W1^T + b1)`` (and the pre-activation in
training, for activations whose derivative reads it), ``out = relu(h W2^T + b2 + x)``; backward
``g1 = (dout' W2) * act'``, ``dx = g1 W1 + dout'``, ``dW = g^T a`` with ``db`` as its row sums (``dW2 = g2^T act(pre)``
computing ``act`` on load of B where the saved tensor is the pre-activation), where ``dout' = dout * (out > 0)`` is
applied on load (the FFN form has no final ReLU: ``dout' = dout``).

Mixed dtypes (autocast: fp32 activations, fp16/bf16 weights): the wider of A and B (SA and SB) is rounded to the
other's dtype on chip, after it is read once in its own dtype; the residual is added un-rounded; C, pre and
rowsum are stored in their tensors' dtypes.

Shapes: A (M, K), B (K, N), SA (M, K2), SB (K2, N), bias (N,), Q like A (MASK "a") or C, residual / gate / pre / C
(M, N). Every stride is passed (a weight is read transposed through its strides, never copied); tile origins are
int64, in-tile offsets int32 (the host keeps stride * tile below 2^31).
Split-K (SPLIT_K > 1, for weight gradients where K is the batch and M x N is small): program (tile, s) sums its
slice of K and writes its fp32 partial (tile and row sums) to slot s of the tile's workspace; the last program to
arrive sums the slots in slot order (two levels, ``_reduce.py``), casts and writes C and rowsum: deterministic,
no float atomics, no further launch. Split-K allows no epilogue.

Schedules (constexprs chosen per autotune config; HOPPER_SCHEDULES offers them on sm_90 for fp16/bf16 beside the
classic configs, and the autotuner keeps whichever is faster). The math above is the same in all of them:
- classic (every config without a schedule): operand tiles loaded through pointers with masks on the ragged edges,
  software-pipelined by Triton (cp.async on sm_80, TMA-free); one program per (tile, K slice).
- "tma": the K loop's operand tiles (A, B, the mask Q on A, SA, SB) are copied by the tensor memory accelerator
  through device-side descriptors (``tl.make_tensor_descriptor``: triton 3.6 and 3.9 alike; 128 bytes of global
  scratch per descriptor and program, from ``triton.set_allocator``), which zero-fill past the bounds. An operand
  stored column-contiguous (A = g^T, B = W^T) is described as its transpose and its tile transposed on chip. Only
  where ``tma_layout`` qualifies every such operand (16-byte aligned base, a unit stride, the other stride a
  multiple of 16 bytes); TMA_LAYOUT is an autotune key, so a choice is never reused across that line.
- "persistent": ``min(tiles, SMs // splits) x splits`` programs; program p of K slice s takes tiles p, p + P, ...
  in GROUP_M order. Split-K takes ``splits = min(SPLIT_K, max(1, SMs // tiles))`` slices (``persistent_grid``):
  as many as fill the SMs beside the tiles, a split chosen per shape and tile size instead of the host's fixed
  one (still deterministic: shape, config and SM count decide, and the slots are summed in order).
- "split": the epilogue runs on two (BLOCK_M, BLOCK_N / 2) halves of the accumulator one after the other, so that
  a 128 x 256 tile with a residual or gate tile fits the registers.
- "ws": Triton's Hopper partitioner warp-specializes the K loop (a producer warp group issues the copies; two
  consumer groups of num_warps warps take half the tile's rows each).

Grid: classic and "tma": ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; "persistent": as above. Tiles walk
GROUP_M row-tiles at a time so that the B tiles they share stay in L2.
FLOPs: ``2 M N (K + K2)``, in every schedule. Bytes moved (each operand once; A is re-read per column tile, B per
row tile; TMA changes who issues the copies, not the bytes): ``(M K + K N + M K2 + K2 N) * in_bytes + M N *
out_bytes`` (+ ``M K`` for Q with MASK "a"; + ``M N`` per residual, Q with MASK "residual", gate, pre; + N for
bias); split-K adds ``~(S + 2 sqrt(S)) M N`` fp32 partials written and read once, S = SPLIT_K (or the
persistent schedule's splits).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import _reduce
from ._cast import narrowed
from ._common import capability, input_precision, launch_device, multiprocessors, next_power_of_2, on_interpreter
from ._launch import CachedLauncher
from ._reduce import sum_slots_in_order
from .activations import IDENTITY, apply, gradient

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Every entry is compiled ahead of time for its
# architecture, dtype class and epilogue in tests/test_kernels_aot.py: it must fit shared memory and not spill.
HOPPER_16BIT = [
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 4),
    (64, 16, 16, 3, 4),
]
AMPERE_16BIT = [
    (128, 256, 32, 3, 8),
    (128, 128, 32, 4, 8),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 16, 16, 3, 4),
]
ANY_32BIT = [
    (128, 128, 32, 3, 8),
    (64, 128, 32, 3, 4),
    (128, 64, 32, 3, 4),
    (64, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
    (32, 16, 16, 3, 4),
]
# Hopper schedules: more candidates for sm_90 fp16/bf16 beside the classic ones above (the autotuner keeps
# whichever is faster). (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, schedule), the schedule naming its
# features, "+"-joined (SCHEDULE_FEATURES): "tma", the operand tiles copied by the tensor memory accelerator through
# device-side descriptors (only where tma_layout() qualifies every operand of the K loop); "persistent", one
# program per SM walking the tiles (persistent_grid()); "split", the epilogue in two (BLOCK_M, BLOCK_N / 2) halves,
# so that 128 x 256 takes a residual or gate tile; "ws", the K loop warp-specialized by Triton's Hopper partitioner
# (a producer warp group issues the copies, two consumer warp groups of num_warps each take half the rows of the
# tile). Not offered to autocast (wide) or smooth-activation launches: the classic tiles serve them.
HOPPER_SCHEDULES = [
    (128, 256, 64, 3, 8, "tma+persistent+split"),
    (128, 128, 64, 4, 8, "tma+persistent"),
    (128, 128, 64, 4, 8, "tma"),
    (128, 256, 64, 3, 4, "tma+persistent+ws"),
]
# Warp specialization only where both tritons partition the loop and the result does not spill (compiled for
# sm_90): with triton 3.6 the partitioner fails on two K loops (a second operand pair) and on the split epilogue
# (reshape / split), and with split-K (its arrival atomics in the tile loop) it leaves the loop unpartitioned, so
# that 4 warps spill a 128 x 256 accumulator; row sums spill 8 bytes. So: no split, and not offered to launches with
# a second pair, split-K or row sums (config_table's warp_specialize).
# Schedule feature -> the kernel's constexpr and its value.
SCHEDULE_FEATURES = {"tma": ("TMA", True), "persistent": ("PERSISTENT", True), "ws": ("WARP_SPECIALIZE", True),
                     "split": ("EPILOGUE_SPLIT", 2)}
# What the interpreter runs (no autotuning there): small tiles keep it quick and exercise the ragged edges.
INTERPRETER_CONFIG = (32, 32, 16, 1, 4)
# A residual or gate tile read in the epilogue needs registers next to the accumulator: with it, tiles above
# 128 x 128 spill, so they are kept for the plain and bias epilogues; a "split" schedule's halves count (but with
# the mask on A too, g1 = (dout' W2) * relu'(h), the split 128 x 256 still spills: 16 bytes with triton 3.9, 40
# with 3.6).
MAX_TILE_WITH_TILE_EPILOGUE = 128 * 128
# On sm_8x these fp32 (TF32) tiles spill (24 bytes at 168 registers) in the backward gate and dx + residual
# epilogues with triton 3.6, the GPU image's version; 3.9 fits them. Dropped from every tile epilogue and triton
# version on sm_8x, one rule for all: 64 x 128 and 128 x 128 remain as large tiles.
AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE = [(128, 64, 32, 3, 4)]
# The ReLU-backward mask on A (two tiles loaded per K step, A modified in registers before the dot) spills with
# 128 x 64 tiles on 4 warps (sm_90 fp16/bf16 128 bytes, sm_80 bf16 24 bytes; others at 255 registers): dropped
# for masked-A launches. (Masking through the load's predicate instead keeps registers low but stops Triton from
# pipelining the A loads.)
MASKED_A_SPILLS = [(128, 64, 4)]
# Autocast launches (an fp32 operand, residual or output next to a 16-bit GEMM) spill with these tiles, keyed
# (sm_90 or later, (BLOCK_M, BLOCK_N, BLOCK_K)): with x as B of a weight gradient, 128 x 256 on sm_90 (112 bytes;
# 255 registers in other variants on sm_80) and 64 x 32 on sm_80 in fp16 (24 bytes); with triton 3.6 also
# 64 x 128 on 4 warps (sm_90 24 bytes; sm_80 fp16 20 bytes in the projection).
WIDE_SPILLS = {(True, (128, 256, 64)), (True, (64, 128, 64)), (False, (128, 256, 32)), (False, (64, 128, 32)),
               (False, (64, 32, 32))}
# Launches that compute a smooth activation (gelu, gelu_tanh, silu) keep only these tiles per place, keyed
# (sm_90 or later, fp32), and the small ones (<= SMALL_TILE elements); compiled with triton 3.6 and 3.9, the others
# spill: 128 x 256 everywhere (24-1280 bytes); in the gate (acc * act'(pre)) 128 x 128 on sm_90 (silu, 16-88 bytes)
# and 64 x 128 on sm_80 (silu, 3.6) or at 255 registers; with act on B's load 64 x 128 on sm_90 (the gelus) and on
# sm_80 (gelu_tanh, 3.6); in the epilogue 128 x 64 on 4 warps with an fp32 x (gelu_tanh). Fewer candidates also keep
# the ahead-of-time compiles and the first call's autotuning short.
SMOOTH_TILES = {
    "epilogue": {(True, False): {(128, 128), (64, 64)}, (False, False): {(64, 128), (64, 64)},
                 (True, True): {(64, 128), (64, 64)}, (False, True): {(64, 128), (64, 64)}},
    "gate": {(True, False): {(64, 64)}, (False, False): {(64, 64)}, (True, True): {(64, 64)},
             (False, True): {(64, 64)}},
    "b": {(True, False): {(128, 128), (64, 64)}, (False, False): {(64, 64)}, (True, True): {(64, 128), (64, 64)},
          (False, True): {(64, 128), (64, 64)}},
}
SMALL_TILE = 64 * 32


def config_table(
    capability: tuple[int, int], element_size: int, tile_epilogue: bool = False, masked_a: bool = False,
    wide: bool = False, smooth: tuple[str, ...] = (), tma: bool = False, warp_specialize: bool = False,
) -> list[tuple]:
    """The autotune candidates for a device of ``capability``, a GEMM in ``element_size`` bytes, whether the
    epilogue reads a residual or gate tile, whether A is masked on load, whether an operand, the residual or
    the output is wider than the GEMM's dtype (autocast), where a smooth activation is computed (``"epilogue"``,
    ``"gate"``, ``"b"``: keys of SMOOTH_TILES), whether the operands qualify for TMA (``tma_layout``), and whether
    the launch may be warp-specialized (no second operand pair, split-K or row sums)."""
    if element_size >= 4:
        table = ANY_32BIT
    else:
        table = HOPPER_16BIT if capability[0] >= 9 else AMPERE_16BIT
    if capability[0] >= 9 and element_size == 2 and not wide and not smooth:
        table = table + [e for e in HOPPER_SCHEDULES if (tma or "tma" not in features(e))
                         and (warp_specialize or "ws" not in features(e))]
    if tile_epilogue:
        table = [e for e in table if e[0] * e[1] <= MAX_TILE_WITH_TILE_EPILOGUE * (
            2 if "split" in features(e) and not masked_a else 1)]
        if element_size >= 4 and capability[0] < 9:
            table = [e for e in table if e not in AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE]
    if masked_a:
        table = [e for e in table if (e[0], e[1], e[4]) not in MASKED_A_SPILLS]
    if wide:
        table = [e for e in table if (capability[0] >= 9, e[:3]) not in WIDE_SPILLS]
    for place in smooth:
        keep = SMOOTH_TILES[place][(capability[0] >= 9, element_size >= 4)]
        table = [e for e in table if e[:2] in keep or e[0] * e[1] <= SMALL_TILE]
    return table


def features(entry: tuple) -> tuple[str, ...]:
    """The Hopper schedule features of a config table entry (none for the classic 5-tuples)."""
    return tuple(entry[5].split("+")) if len(entry) > 5 else ()


def smooth_places(activation: str, gate: str, b_activation: str) -> tuple[str, ...]:
    """Where a launch with these constexprs computes a smooth activation (config_table's ``smooth``)."""
    places = (("epilogue", activation), ("gate", gate), ("b", b_activation))
    return tuple(place for place, name in places if name not in (IDENTITY, "relu"))


def schedule_constexprs(entry: tuple) -> dict:
    """The kernel's constexprs for a config table entry's schedule (empty for the classic kernel: the defaults)."""
    return dict(SCHEDULE_FEATURES[f] for f in features(entry))


def _as_config(entry: tuple) -> triton.Config:
    block_m, block_n, block_k, stages, warps = entry[:5]
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                          **schedule_constexprs(entry)}, num_stages=stages, num_warps=warps)


# The Hopper schedules first: the prune hook's fallback for tiny problems is the last (smallest) classic tile.
_ALL_ENTRIES = list(dict.fromkeys(HOPPER_SCHEDULES + HOPPER_16BIT + AMPERE_16BIT + ANY_32BIT))


def _prune(configs, named_args, **kwargs):
    """Keep the candidates of this device and dtype, and drop tiles far larger than the problem."""
    args = {**named_args, **kwargs}  # the flags arrive as keywords
    a = args["a_ptr"]
    size = min(a.element_size(), args["b_ptr"].element_size())  # the GEMM's dtype: the narrower operand
    wide = max(args[n].element_size() for n in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")) > size
    tile_epilogue = args["HAS_RESIDUAL"] or args["GATE"] != IDENTITY
    smooth = smooth_places(args["ACTIVATION"], args["GATE"], args["B_ACTIVATION"])
    warp_specialize = not (args["HAS_SECOND"] or args["HAS_ROWSUM"] or args["SPLIT_K"] > 1)
    allowed = set(config_table(capability(a.device), size, tile_epilogue, args["MASK"] == "a", wide, smooth,
                               args["TMA_LAYOUT"] != "", warp_specialize))
    m, n, k = args["M"], args["N"], max(args["K"], args["K2"])
    fits = [c for c in configs if _config_key(c) in allowed]
    small = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(n))
             and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k))
             and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))]
    return small or fits[-1:]


def _config_key(c: triton.Config) -> tuple:
    """The config table entry of an autotune config."""
    key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
    schedule = "+".join(f for f, (name, value) in SCHEDULE_FEATURES.items() if c.kwargs.get(name) == value)
    return (*key, schedule) if schedule else key


@triton.jit
def _descriptor(ptr, rows, cols, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """A TMA descriptor for BLOCK_R x BLOCK_C tiles of the (rows, cols) operand at ``ptr``. TRANSPOSED: the operand
    is stored column-contiguous (stride_r == 1), so the descriptor walks its transpose (the copy engine needs the
    last stride to be 1) and ``_tma_tile`` transposes each tile back on chip."""
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, [cols, rows], [stride_c, stride_r], [BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(ptr, [rows, cols], [stride_r, stride_c], [BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def _tma_tile(desc, r, c, TRANSPOSED: tl.constexpr):
    """The tile at (r, c) of the operand ``desc`` describes (``_descriptor``); out of bounds reads as 0."""
    if TRANSPOSED:
        tile = desc.load([c, r]).T
    else:
        tile = desc.load([r, c])
    return tile


@triton.jit
def _tma_dot(acc, rowsum, a_desc, b_desc, q_desc, row, col, k_start, steps,
             A_T: tl.constexpr, B_T: tl.constexpr, MASK_A: tl.constexpr, B_ACTIVATION: tl.constexpr,
             HAS_ROWSUM: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
             WARP_SPECIALIZE: tl.constexpr):
    """``acc += A'[row tile, k_start:] @ B'[k_start:, col tile]`` over ``steps`` BLOCK_K steps, the tiles copied to
    shared memory by the copy engine (TMA); A' and B' as in the module docstring. No masks: the descriptors know
    the bounds and fill zeros past them."""
    for i in tl.range(0, steps, warp_specialize=WARP_SPECIALIZE):
        k = k_start + i * BLOCK_K
        a = _tma_tile(a_desc, row, k, A_T)
        b = _tma_tile(b_desc, k, col, B_T)
        if MASK_A:  # A = dY * (Y > 0), aten's rule (as in the pointer loop)
            a = tl.where(_tma_tile(q_desc, row, k, A_T) <= 0, 0.0, a)
        if B_ACTIVATION != "identity":
            b = apply(b.to(tl.float32), B_ACTIVATION).to(b.dtype)
        a = narrowed(a, b)
        b = narrowed(b, a)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
    return acc, rowsum


@triton.jit
def _epilogue(acc, row0, col0, tile_m, mask_m, N,
              bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr,
              stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
              stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK: tl.constexpr, GATE: tl.constexpr,
              STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr, WIDTH: tl.constexpr):
    """Bias, residual, gate, pre-activation and activation on the (BLOCK_M, WIDTH) accumulator tile whose first
    column is ``col0``, then the store of C."""
    tile_n = tl.arange(0, WIDTH)
    mask_n = tile_n < N - col0
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col0 + tile_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_ptrs = (res_ptr + row0 * stride_rm + col0 * stride_rn
                    + (tile_m[:, None] * stride_rm + tile_n[None, :] * stride_rn))
        residual = tl.load(res_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
        if MASK == "residual":  # residual = dY * (Y > 0), as MASK "a"
            mask_tile = (mask_ptr + row0 * stride_qm + col0 * stride_qk
                         + (tile_m[:, None] * stride_qm + tile_n[None, :] * stride_qk))
            residual = tl.where(tl.load(mask_tile, mask=mask_mn, other=0.0) <= 0, 0.0, residual)
        acc += residual
    if GATE != "identity":  # backward through the activation: acc * act'(saved)
        gate_ptrs = (gate_ptr + row0 * stride_gm + col0 * stride_gn
                     + (tile_m[:, None] * stride_gm + tile_n[None, :] * stride_gn))
        acc = gradient(acc, tl.load(gate_ptrs, mask=mask_mn, other=0.0), GATE)
    if STORE_PRE:  # the pre-activation, kept for backward
        pre_ptrs = (pre_ptr + row0 * stride_pm + col0 * stride_pn
                    + (tile_m[:, None] * stride_pm + tile_n[None, :] * stride_pn))
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=mask_mn)
    acc = apply(acc, ACTIVATION)
    c_ptrs = c_ptr + row0 * stride_cm + col0 * stride_cn + (tile_m[:, None] * stride_cm + tile_n[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _tile(
    tile, split, splits,
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr, rowsum_ptr,
    ws_ptr, counters_ptr, a_desc, b_desc, q_desc, sa_desc, sb_desc,
    M, N, K, K2,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
    stride_cm, stride_cn,
    reduce_group,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr, B_ACTIVATION: tl.constexpr,
    HAS_ROWSUM: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """Output tile ``tile`` (GROUP_M order), K slice ``split`` of ``splits``: the whole of one program's work
    without a persistent schedule, one iteration of its tile loop with one."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows

    # 64-bit tile origins, 32-bit offsets inside a tile (the host keeps every stride * tile size < 2^31):
    # full int64 pointer arithmetic per element would double the registers the epilogue needs.
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    tile_m = tl.arange(0, BLOCK_M)
    tile_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = tile_m < M - row0
    mask_n = tile_n < N - col0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # This program's slice of K (all of it without split-K), in whole BLOCK_K steps.
    k_per_split = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = min(K, k_start + k_per_split)
    if TMA:
        acc, rowsum = _tma_dot(acc, rowsum, a_desc, b_desc, q_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_start,
                               tl.cdiv(k_end - k_start, BLOCK_K), A_T, B_T, MASK == "a", B_ACTIVATION, HAS_ROWSUM,
                               INPUT_PRECISION, BLOCK_K, WARP_SPECIALIZE)
    else:
        a_ptrs = (a_ptr + row0 * stride_am + tl.cast(k_start, tl.int64) * stride_ak
                  + (tile_m[:, None] * stride_am + offs_k[None, :] * stride_ak))
        b_ptrs = (b_ptr + tl.cast(k_start, tl.int64) * stride_bk + col0 * stride_bn
                  + (offs_k[:, None] * stride_bk + tile_n[None, :] * stride_bn))
        q_ptrs = (mask_ptr + row0 * stride_qm + tl.cast(k_start, tl.int64) * stride_qk
                  + (tile_m[:, None] * stride_qm + offs_k[None, :] * stride_qk))
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
        b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
        q_step = BLOCK_K * tl.cast(stride_qk, tl.int64)
        for k in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
            mask_k = offs_k < k_end - k_start - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if MASK == "a":  # A = dY * (Y > 0), the ReLU backward on load (aten's rule: 0 where Y <= 0)
                a = tl.where(tl.load(q_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0) <= 0, 0.0, a)
                q_ptrs += q_step
            if B_ACTIVATION != "identity":  # B = act(pre) from a saved pre-activation, computed on load
                b = apply(b.to(tl.float32), B_ACTIVATION).to(b.dtype)
            a = narrowed(a, b)
            b = narrowed(b, a)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            if HAS_ROWSUM:
                rowsum += tl.sum(a.to(tl.float32), axis=1)
            a_ptrs += a_step
            b_ptrs += b_step

    if HAS_SECOND:
        if TMA:
            acc, rowsum = _tma_dot(acc, rowsum, sa_desc, sb_desc, sa_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0,
                                   tl.cdiv(K2, BLOCK_K), A_T, B_T, False, "identity", False, INPUT_PRECISION, BLOCK_K,
                                   WARP_SPECIALIZE)
        else:
            sa_ptrs = sa_ptr + row0 * stride_sam + (tile_m[:, None] * stride_sam + offs_k[None, :] * stride_sak)
            sb_ptrs = sb_ptr + col0 * stride_sbn + (offs_k[:, None] * stride_sbk + tile_n[None, :] * stride_sbn)
            sa_step = BLOCK_K * tl.cast(stride_sak, tl.int64)
            sb_step = BLOCK_K * tl.cast(stride_sbk, tl.int64)
            for k in range(0, K2, BLOCK_K):
                mask_k = offs_k < K2 - k
                sa = tl.load(sa_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                sb = tl.load(sb_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                sa = narrowed(sa, sb)
                sb = narrowed(sb, sa)
                acc = tl.dot(sa, sb, acc, input_precision=INPUT_PRECISION)
                sa_ptrs += sa_step
                sb_ptrs += sb_step

    write = True
    if SPLIT_K > 1:
        # This program's fp32 partial goes to its slot of the tile's workspace; the last to arrive gets the sum of
        # all slots in slot order (deterministic, no float atomics; _reduce.py) and alone writes the result.
        # Workspace and counters are laid out for SPLIT_K slices; a persistent launch may use fewer (even one:
        # branching around the workspace at run time breaks triton 3.9's layout pass).
        slot = BLOCK_M * BLOCK_N + BLOCK_M
        slots = SPLIT_K + tl.cdiv(SPLIT_K, reduce_group) + 1
        tile_ws = ws_ptr + tl.cast(tile, tl.int64) * (slots * slot)
        in_tile = tile_m[:, None] * BLOCK_N + tile_n[None, :]
        tl.store(tile_ws + split * slot + in_tile, acc)
        tl.store(tile_ws + split * slot + BLOCK_M * BLOCK_N + tile_m, rowsum)
        write = sum_slots_in_order(tile_ws, counters_ptr + tile * (slots - SPLIT_K), split, splits, reduce_group,
                                   slot, 1024)
        if write:
            total = tile_ws + (splits + tl.cdiv(splits, reduce_group)) * slot
            acc = tl.load(total + in_tile)
            rowsum = tl.load(total + BLOCK_M * BLOCK_N + tile_m)

    if write:
        if EPILOGUE_SPLIT == 2:  # two (BLOCK_M, BLOCK_N / 2) halves, one after the other: half the epilogue's registers
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _epilogue(left, row0, col0, tile_m, mask_m, N, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr,
                      stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
                      stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, BLOCK_N // 2)
            _epilogue(right, row0, col0 + BLOCK_N // 2, tile_m, mask_m, N, bias_ptr, res_ptr, mask_ptr, gate_ptr,
                      pre_ptr, c_ptr, stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm,
                      stride_pn, stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION,
                      BLOCK_N // 2)
        else:
            _epilogue(acc, row0, col0, tile_m, mask_m, N, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr,
                      stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
                      stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, BLOCK_N)
        if HAS_ROWSUM:
            if pid_n == 0:
                tl.store(rowsum_ptr + row0 + tile_m, rowsum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def fused_linear_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr, rowsum_ptr,
    ws_ptr, counters_ptr,
    M, N, K, K2,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_sam, stride_sak, stride_sbk, stride_sbn,
    stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
    stride_cm, stride_cn,
    reduce_group,  # split-K: partial slices per group of the in-kernel reduction (see _reduce.py)
    M_BUCKET, K_BUCKET,  # autotune keys only: powers of two, so a new batch size reuses a tuned config
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr, B_ACTIVATION: tl.constexpr,
    HAS_ROWSUM: tl.constexpr,
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA_LAYOUT: tl.constexpr,  # tma_layout(): "" where the operands do not qualify for TMA, else their layout
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # The Hopper schedule (HOPPER_SCHEDULES); the defaults are the classic kernel.
    TMA: tl.constexpr = False, PERSISTENT: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
    EPILOGUE_SPLIT: tl.constexpr = 1,
):
    A_T: tl.constexpr = TMA_LAYOUT == "mk" or TMA_LAYOUT == "mn"  # A stored M-contiguous (A = g^T)
    B_T: tl.constexpr = TMA_LAYOUT == "kk" or TMA_LAYOUT == "mk"  # B stored K-contiguous (B = W^T)
    a_desc, b_desc, q_desc, sa_desc, sb_desc = a_ptr, b_ptr, mask_ptr, sa_ptr, sb_ptr
    if TMA:
        tl.static_assert(TMA_LAYOUT != "", "TMA schedules run only where tma_layout() qualifies the operands")
        a_desc = _descriptor(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = _descriptor(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
        if MASK == "a":
            q_desc = _descriptor(mask_ptr, M, K, stride_qm, stride_qk, BLOCK_M, BLOCK_K, A_T)
        if HAS_SECOND:
            sa_desc = _descriptor(sa_ptr, M, K2, stride_sam, stride_sak, BLOCK_M, BLOCK_K, A_T)
            sb_desc = _descriptor(sb_ptr, K2, N, stride_sbk, stride_sbn, BLOCK_K, BLOCK_N, B_T)
    if PERSISTENT:
        # Grid (programs, splits): program p of K slice s takes tiles p, p + programs, ... (persistent_grid()).
        for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _tile(tile, tl.program_id(1), tl.num_programs(1),
                  a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr, rowsum_ptr,
                  ws_ptr, counters_ptr, a_desc, b_desc, q_desc, sa_desc, sb_desc, M, N, K, K2,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_sam, stride_sak, stride_sbk, stride_sbn,
                  stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
                  stride_cm, stride_cn, reduce_group,
                  HAS_SECOND, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, B_ACTIVATION, HAS_ROWSUM,
                  SPLIT_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, A_T, B_T, WARP_SPECIALIZE,
                  EPILOGUE_SPLIT)
    else:
        # Grid (tiles, SPLIT_K).
        _tile(tl.program_id(0), tl.program_id(1), SPLIT_K,
              a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr, rowsum_ptr,
              ws_ptr, counters_ptr, a_desc, b_desc, q_desc, sa_desc, sb_desc, M, N, K, K2,
              stride_am, stride_ak, stride_bk, stride_bn, stride_sam, stride_sak, stride_sbk, stride_sbn,
              stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
              stride_cm, stride_cn, reduce_group,
              HAS_SECOND, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, B_ACTIVATION, HAS_ROWSUM,
              SPLIT_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, A_T, B_T, WARP_SPECIALIZE,
              EPILOGUE_SPLIT)


# TMA_LAYOUT is in the key (and, as a constexpr, in the launch cache's): a choice made where the operands qualify
# for TMA is never reused for a call where they do not.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "K2", "HAS_SECOND", "HAS_BIAS", "HAS_RESIDUAL", "MASK", "GATE",
                 "STORE_PRE", "ACTIVATION", "B_ACTIVATION", "HAS_ROWSUM", "SPLIT_K", "INPUT_PRECISION", "TMA_LAYOUT"]
fused_linear_autotuned = triton.autotune(
    configs=[_as_config(e) for e in _ALL_ENTRIES],
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(fused_linear_kernel)
_launch_tuned = CachedLauncher(fused_linear_autotuned)
_launch_fixed = CachedLauncher(fused_linear_kernel)


def _strides(t: torch.Tensor | None, dims: int = 2) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


# In-tile offsets are int32: stride * tile size must stay below 2^31 (tiles are at most 256 wide).
_MAX_STRIDE = 2**31 // 256


def _tile_safe(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a row-major copy of it in the rare case that a stride is too large for int32 in-tile offsets."""
    if t is None or max(t.stride(), default=0) < _MAX_STRIDE:
        return t
    return t.contiguous()


def _tma_dim(t: torch.Tensor, dims: str) -> str:
    """Which dim of the 2-D ``t`` (named by ``dims``) the copy engine can walk as its contiguous one: stride 1, the
    other stride a multiple of 16 bytes, the base 16-byte aligned; "" if none. (Per call on sm_90: kept lean.)"""
    s0, s1 = t.stride()
    if t.data_ptr() & 15:
        return ""
    if s1 == 1:
        return dims[1] if not s0 * t.element_size() & 15 else ""
    if s0 == 1:
        return dims[0] if not s1 * t.element_size() & 15 else ""
    return ""


def tma_layout(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor | None = None, sb: torch.Tensor | None = None,
               q: torch.Tensor | None = None) -> str:
    """The kernel's TMA_LAYOUT: A's contiguous dim ("k": row-major, "m": A = g^T) then B's ("n": row-major, "k":
    B = W^T) where every operand the K loop reads (A, B, the mask Q on A, the second pair) meets TMA's rules,
    Q and SA laid out as A and SB as B; else "" (no TMA config may run)."""
    a_dim, b_dim = _tma_dim(a, "mk"), _tma_dim(b, "kn")
    if not a_dim or not b_dim:
        return ""
    if (q is not None and _tma_dim(q, "mk") != a_dim) or (sa is not None and (
            _tma_dim(sa, "mk") != a_dim or _tma_dim(sb, "kn") != b_dim)):
        return ""
    return a_dim + b_dim


def persistent_grid(tiles: int, split_k: int, sms: int) -> tuple[int, int]:
    """(programs, K slices) of a persistent launch: at most one program per SM. Split-K takes as many of the
    ``split_k`` slices as fill the SMs beside the tiles (deterministic: shape, config and SM count decide)."""
    splits = min(split_k, max(1, sms // tiles))
    return min(tiles, max(1, sms // splits)), splits


def _grid(m: int, n: int, split_k: int, device: torch.device, block_m: int, block_n: int,
          persistent: bool) -> tuple[int, int]:
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return persistent_grid(tiles, split_k, multiprocessors(device)) if persistent else (tiles, split_k)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the device-side TMA descriptors (128 bytes each per program), on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Device-side descriptors need ``triton.set_allocator``; ours is set unless the caller has set their own.
    (triton 3.6 and 3.9 keep it in the same ContextVar, per thread; its default raises at launch.)"""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@functools.lru_cache(maxsize=256)
def _split_k_sizes(m: int, n: int, split_k: int, config: tuple | None) -> tuple[int, int]:
    """(fp32 workspace elements, counters) of a split-K launch: the most any candidate tile needs."""
    slots, counters = _reduce.workspace_slots(split_k), _reduce.counters_needed(split_k)
    entries = [config] if config is not None else _ALL_ENTRIES
    tiles = [(triton.cdiv(m, bm) * triton.cdiv(n, bn), bm * bn + bm) for bm, bn, *_ in entries]
    return max(t * slots * size for t, size in tiles), max(t * counters for t, _ in tiles)


def fused_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu_mask: torch.Tensor | None = None,
    mask_on: str = "a",
    gate: torch.Tensor | None = None,
    gate_activation: str = "relu",
    activation: str | None = None,
    pre_out: torch.Tensor | None = None,
    b_activation: str | None = None,
    rowsum: bool = False,
    split_k: int = 1,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``C = epilogue(a @ b [+ sa @ sb])`` as documented above; returns ``(C, rowsum or None)``.

    ``a (M, K)`` and ``b (K, N)`` are any strided views (pass ``w.t()`` for ``x @ w.T``); ``second = (sa, sb)``
    joins along K. ``relu_mask``: a ReLU's output ``Y`` whose mask ``Y > 0`` multiplies ``a`` on load
    (``mask_on="a"``, shaped like ``a``) or the residual (``mask_on="residual"``). ``gate``: the saved tensor of
    ``gate_activation`` (its output for relu, else its input), by whose derivative the result is multiplied.
    ``activation``: applied last (None: identity); ``pre_out``: an ``(M, N)`` tensor that also gets the result
    before it. ``b_activation``: ``b`` holds a pre-activation, and ``act(b)`` is used (computed on load).
    Operands may be wider than the GEMM's dtype (autocast): the wider of ``a`` and ``b`` is rounded to the
    other's dtype on chip. ``C`` is a new row-major ``(M, N)`` tensor of ``out_dtype`` (default ``a.dtype``), or
    ``out`` when given (any strides); ``rowsum`` ``(M,)`` has ``C``'s dtype. ``config`` forces one ``(BLOCK_M,
    BLOCK_N, BLOCK_K, num_stages, num_warps[, schedule])`` instead of autotuning (the interpreter always uses a
    fixed one); a "tma" schedule needs operands that qualify (``tma_layout``).
    """
    sa, sb = second if second is not None else (None, None)
    a, b, sa, sb, residual, relu_mask, gate = (_tile_safe(t) for t in (a, b, sa, sb, residual, relu_mask, gate))
    M, K = a.shape
    N = b.shape[1]
    K2 = sa.shape[1] if sa is not None else 0
    has_epilogue = bias is not None or residual is not None or gate is not None or pre_out is not None or activation
    if split_k > 1 and (out is not None or sa is not None or has_epilogue):
        raise ValueError("fused_linear: split-K takes no epilogue and no second operand")
    out_dtype = out_dtype or a.dtype
    for t in (out, pre_out):
        if t is not None and max(t.stride()) >= _MAX_STRIDE:
            raise ValueError(f"fused_linear: output strides {t.stride()} are too large for in-tile offsets")
    c = out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
    sums = torch.empty((M,), device=a.device, dtype=c.dtype) if rowsum else None
    if rowsum and N == 0 and M > 0:  # the row sums ride on the GEMM's tiles: with no columns there are none
        raise ValueError("fused_linear: rowsum needs N > 0")
    if M == 0 or N == 0:
        return c, sums
    if K == 0 and K2 == 0:
        # No K loop at all: the accumulator is 0 and the epilogue alone decides.
        a, K, relu_mask = a.new_zeros((M, 1)), 1, relu_mask if mask_on == "residual" else None
        b = b.new_zeros((1, N))
    if config is None and on_interpreter(a.device):
        config = INTERPRETER_CONFIG
    ws = counters = c
    used_counters = None
    if split_k > 1:
        ws_elements, counter_count = _split_k_sizes(M, N, split_k, config)
        ws = torch.empty((ws_elements,), device=a.device, dtype=torch.float32)
        counters = used_counters = _reduce.arrival_counters(a.device, counter_count)
    mask = "none" if relu_mask is None else mask_on
    layout = ""
    if a.dtype == b.dtype and capability(a.device)[0] >= 9:
        layout = tma_layout(a, b, sa, sb, relu_mask if mask == "a" else None)
        if layout and a.is_cuda:
            _ensure_scratch_allocator()
    args = (
        a, b, sa if sa is not None else a, sb if sb is not None else b,
        bias if bias is not None else c, residual if residual is not None else c,
        relu_mask if relu_mask is not None else c, gate if gate is not None else c,
        pre_out if pre_out is not None else c,
        c, sums if sums is not None else c, ws, counters,
        M, N, K, K2,
        *a.stride(), *b.stride(), *_strides(sa), *_strides(sb),
        *_strides(residual), *_strides(relu_mask), *_strides(gate), *_strides(pre_out), *c.stride(),
        _reduce.group_size(split_k), next_power_of_2(M), next_power_of_2(K),
    )
    flags = {
        "HAS_SECOND": sa is not None, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
        "MASK": mask, "GATE": gate_activation if gate is not None else IDENTITY,
        "STORE_PRE": pre_out is not None,
        "ACTIVATION": activation or IDENTITY, "B_ACTIVATION": b_activation or IDENTITY, "HAS_ROWSUM": rowsum,
        "SPLIT_K": split_k,
        "INPUT_PRECISION": input_precision(a if a.element_size() <= b.element_size() else b),
        "TMA_LAYOUT": layout,
    }
    with launch_device(a.device), _reduce.reset_on_failure(used_counters):
        if config is None:
            grid = lambda meta: _grid(M, N, split_k, a.device, meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"])
            _launch_tuned(grid, *args, **flags)
        else:
            block_m, block_n, block_k, stages, warps = config[:5]
            schedule = schedule_constexprs(config)
            if schedule.get("TMA") and not layout:
                raise ValueError(f"fused_linear: config {config} needs operands that qualify for TMA")
            grid = _grid(M, N, split_k, a.device, block_m, block_n, schedule.get("PERSISTENT", False))
            _launch_fixed(grid, *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                          **schedule, num_stages=stages, num_warps=warps)
    return c, sums
