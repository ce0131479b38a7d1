"""Fused linear: one tiled GEMM whose epilogue applies bias, residual, ReLU-gate and ReLU on the fp32 accumulator.

Math, per output element (all arithmetic in fp32, one rounding at the store):

    acc[m, n]  = sum_k A[m, k] B[k, n]
               + sum_k A2[m, k] B2[k, n]          (HAS_SECOND: a second operand pair joins along K, e.g. the
                                                    projection shortcut  x Ws^T  or  g2 Ws  in backward)
    acc       += bias[n]                          (HAS_BIAS)
    acc       += residual[m, n]                   (HAS_RESIDUAL)
    acc        = gate[m, n] <= 0 ? 0 : acc        (HAS_GATE: ReLU backward, the rule aten.threshold_backward uses)
    acc        = acc < 0 ? 0 : acc                (APPLY_RELU: NaN stays NaN, as in torch.relu)
    C[m, n]    = acc
    rowsum[m]  = sum_k A[m, k]                    (HAS_ROWSUM: with A = dY^T this is the bias gradient)

Every layer of the residual block is one call: forward ``h = relu(x W1^T + b1)``, ``out = relu(h W2^T + b2 + x)``;
backward ``g1 = (g2 W2) * (h > 0)``, ``dx = g1 W1 + g2``, ``dW = g^T a`` with ``db`` as its row sums.

Shapes: A (M, K), B (K, N), A2 (M, K2), B2 (K2, N), bias (N,), residual / gate / C (M, N). Every stride is
passed (a weight is read transposed through its strides, never copied); row and column offsets are int64.
Split-K (SPLIT_K > 1, for weight gradients where K is the batch and M x N is small): program (tile, s) sums its
slice of K and writes fp32 partials into slice s of a (SPLIT_K, M, N) workspace (row sums into (SPLIT_K, M));
the host sums the slices in a fixed order: deterministic, no atomics. Split-K allows no epilogue.

Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``; tiles walk GROUP_M row-tiles at a time so that the
B tiles they share stay in L2.
FLOPs: ``2 M N (K + K2)``. Bytes moved (each operand once; A is re-read per column tile, B per row tile):
``(M K + K N + M K2 + K2 N) * in_bytes + M N * out_bytes (+ M N * in_bytes per residual / gate, + N for bias)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import capability, input_precision, launch_device, next_power_of_2, on_interpreter

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
# What the interpreter runs (no autotuning there): small tiles keep it quick and exercise the ragged edges.
INTERPRETER_CONFIG = (32, 32, 16, 1, 4)
# A residual or gate tile read in the epilogue needs registers next to the accumulator: with it, tiles above
# 128 x 128 spill, so they are kept for the plain and bias epilogues.
MAX_TILE_WITH_TILE_EPILOGUE = 128 * 128
# On sm_8x these fp32 (TF32) tiles spill (24 bytes at 168 registers) in the backward gate and dx + residual
# epilogues with triton 3.6, the GPU image's version; 3.9 fits them. Dropped from every tile epilogue and triton
# version on sm_8x, one rule for all: 64 x 128 and 128 x 128 remain as large tiles.
AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE = [(128, 64, 32, 3, 4)]


def config_table(
    capability: tuple[int, int], element_size: int, tile_epilogue: bool = False
) -> list[tuple[int, int, int, int, int]]:
    """The autotune candidates for a device of ``capability``, inputs of ``element_size`` bytes, and whether
    the epilogue reads a residual or gate tile."""
    if element_size >= 4:
        table = ANY_32BIT
    else:
        table = HOPPER_16BIT if capability[0] >= 9 else AMPERE_16BIT
    if tile_epilogue:
        table = [e for e in table if e[0] * e[1] <= MAX_TILE_WITH_TILE_EPILOGUE]
        if element_size >= 4 and capability[0] < 9:
            table = [e for e in table if e not in AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE]
    return table


def _as_config(entry: tuple[int, int, int, int, int]) -> triton.Config:
    block_m, block_n, block_k, stages, warps = entry
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


_ALL_ENTRIES = list(dict.fromkeys(HOPPER_16BIT + AMPERE_16BIT + ANY_32BIT))


def _prune(configs, named_args, **kwargs):
    """Keep the candidates of this device and dtype, and drop tiles far larger than the problem."""
    args = {**named_args, **kwargs}  # the flags arrive as keywords
    a = args["a_ptr"]
    tile_epilogue = args["HAS_RESIDUAL"] or args["HAS_GATE"]
    allowed = set(config_table(capability(a.device), a.element_size(), tile_epilogue))
    m, n, k = args["M"], args["N"], max(args["K"], args["K2"])
    fits = [c for c in configs if _config_key(c) in allowed]
    small = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(n))
             and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k))
             and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))]
    return small or fits[-1:]


def _config_key(c: triton.Config) -> tuple[int, int, int, int, int]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)


@triton.jit
def fused_linear_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, res_ptr, gate_ptr, c_ptr, rowsum_ptr,
    M, N, K, K2,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_rm, stride_rn, stride_gm, stride_gn,
    stride_cs, stride_cm, stride_cn, stride_rowsum_s,
    M_BUCKET, K_BUCKET,  # autotune keys only: powers of two, so a new batch size reuses a tuned config
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
    APPLY_RELU: tl.constexpr, HAS_ROWSUM: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

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
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    a_ptrs = (a_ptr + row0 * stride_am + tl.cast(k_start, tl.int64) * stride_ak
              + (tile_m[:, None] * stride_am + offs_k[None, :] * stride_ak))
    b_ptrs = (b_ptr + tl.cast(k_start, tl.int64) * stride_bk + col0 * stride_bn
              + (offs_k[:, None] * stride_bk + tile_n[None, :] * stride_bn))
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
    for k in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        mask_k = offs_k < k_end - k_start - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += a_step
        b_ptrs += b_step

    if HAS_SECOND:
        a2_ptrs = a2_ptr + row0 * stride_a2m + (tile_m[:, None] * stride_a2m + offs_k[None, :] * stride_a2k)
        b2_ptrs = b2_ptr + col0 * stride_b2n + (offs_k[:, None] * stride_b2k + tile_n[None, :] * stride_b2n)
        a2_step = BLOCK_K * tl.cast(stride_a2k, tl.int64)
        b2_step = BLOCK_K * tl.cast(stride_b2k, tl.int64)
        for k in range(0, K2, BLOCK_K):
            mask_k = offs_k < K2 - k
            a2 = tl.load(a2_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=INPUT_PRECISION)
            a2_ptrs += a2_step
            b2_ptrs += b2_step

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col0 + tile_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        res_ptrs = (res_ptr + row0 * stride_rm + col0 * stride_rn
                    + (tile_m[:, None] * stride_rm + tile_n[None, :] * stride_rn))
        acc += tl.load(res_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate_ptrs = (gate_ptr + row0 * stride_gm + col0 * stride_gn
                     + (tile_m[:, None] * stride_gm + tile_n[None, :] * stride_gn))
        acc = tl.where(tl.load(gate_ptrs, mask=mask_mn, other=0.0) <= 0, 0.0, acc)
    if APPLY_RELU:
        acc = tl.where(acc < 0, 0.0, acc)
    c_ptrs = (c_ptr + tl.cast(pid_k, tl.int64) * stride_cs + row0 * stride_cm + col0 * stride_cn
              + (tile_m[:, None] * stride_cm + tile_n[None, :] * stride_cn))
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_mn)
    if HAS_ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + tl.cast(pid_k, tl.int64) * stride_rowsum_s + row0 + tile_m, rowsum, mask=mask_m)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "K2", "HAS_SECOND", "HAS_BIAS", "HAS_RESIDUAL", "HAS_GATE",
                 "APPLY_RELU", "HAS_ROWSUM", "SPLIT_K", "INPUT_PRECISION"]
fused_linear_autotuned = triton.autotune(
    configs=[_as_config(e) for e in _ALL_ENTRIES],
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)(fused_linear_kernel)


def _strides(t: torch.Tensor | None, dims: int = 2) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


# In-tile offsets are int32: stride * tile size must stay below 2^31 (tiles are at most 256 wide).
_MAX_STRIDE = 2**31 // 256


def _tile_safe(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a row-major copy of it in the rare case that a stride is too large for int32 in-tile offsets."""
    if t is None or max(t.stride(), default=0) < _MAX_STRIDE:
        return t
    return t.contiguous()


def fused_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    relu: bool = False,
    rowsum: bool = False,
    split_k: int = 1,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``C = epilogue(a @ b [+ a2 @ b2])`` as documented above; returns ``(C, rowsum or None)``.

    ``a (M, K)`` and ``b (K, N)`` are any strided views (pass ``w.t()`` for ``x @ w.T``). ``C`` is a new
    row-major ``(M, N)`` tensor of ``out_dtype`` (default ``a.dtype``), or ``out`` when given (any strides;
    not with split-K); ``rowsum`` is fp32 ``(M,)``.
    ``config`` forces one ``(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)`` instead of autotuning (the
    interpreter always uses a fixed one).
    """
    a, b, a2, b2, residual, gate = (_tile_safe(t) for t in (a, b, a2, b2, residual, gate))
    M, K = a.shape
    N = b.shape[1]
    K2 = a2.shape[1] if a2 is not None else 0
    has_epilogue = bias is not None or residual is not None or gate is not None or relu
    if split_k > 1 and (out is not None or a2 is not None or has_epilogue):
        raise ValueError("fused_linear: split-K takes no epilogue and no second operand")
    out_dtype = out_dtype or a.dtype
    if split_k > 1:
        c = torch.empty((split_k, M, N), device=a.device, dtype=torch.float32)
        c_strides = c.stride()
    else:
        if out is not None and max(out.stride()) >= _MAX_STRIDE:
            raise ValueError(f"fused_linear: out strides {out.stride()} are too large for in-tile offsets")
        c = out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
        c_strides = (0, *c.stride())
    sums = torch.empty((split_k, M), device=a.device, dtype=torch.float32) if rowsum else None
    if M == 0 or N == 0:
        return _finish(c, sums, split_k, out_dtype)
    if K == 0 and K2 == 0:
        # No K loop at all: the accumulator is 0 and the epilogue alone decides.
        a, K = a.new_zeros((M, 1)), 1
        b = b.new_zeros((1, N))

    args = (
        a, b, a2 if a2 is not None else a, b2 if b2 is not None else b,
        bias if bias is not None else c, residual if residual is not None else c,
        gate if gate is not None else c, c, sums if sums is not None else c,
        M, N, K, K2,
        *a.stride(), *b.stride(), *_strides(a2), *_strides(b2),
        *_strides(residual), *_strides(gate), *c_strides, sums.stride(0) if sums is not None else 0,
        next_power_of_2(M), next_power_of_2(K),
    )
    flags = {
        "HAS_SECOND": a2 is not None, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
        "HAS_GATE": gate is not None, "APPLY_RELU": relu, "HAS_ROWSUM": rowsum, "SPLIT_K": split_k,
        "INPUT_PRECISION": input_precision(a),
    }
    with launch_device(a.device):
        if config is None and on_interpreter(a.device):
            config = INTERPRETER_CONFIG
        if config is None:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)
            fused_linear_autotuned[grid](*args, **flags)
        else:
            block_m, block_n, block_k, stages, warps = config
            grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
            fused_linear_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                      GROUP_M=8, num_stages=stages, num_warps=warps)
    return _finish(c, sums, split_k, out_dtype)


def _finish(c, sums, split_k, out_dtype):
    if split_k > 1:
        c = c.sum(0).to(out_dtype)  # fixed-order reduction over the slices: deterministic
    if sums is not None:
        sums = sums.sum(0)
    return c, sums
