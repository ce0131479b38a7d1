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
    signs(C)                                      (STORE_SIGNS: C's packed sign bits, ``_signs.py``, through pre_ptr
                                                    and its row stride stride_pm; a recompute block's final ReLU)
    rowsum[m]  = sum_k A'[m, k]                   (HAS_ROWSUM: with A = dY^T this is the bias gradient)

The ReLU masks may come as packed sign bits (SIGN_BITS, ``_signs.py``) instead of Q: Y's row stride is stride_qm,
and Y's rows lie on the kernel's m axis (1: A = dY, or the residual) or its k axis (2: A = dY^T, a weight
gradient); ``M K / 8`` (or ``M N / 8``) bytes are read instead of Q. Only the classic schedule reads them.

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
FLOPs: ``2 M N (K + K2)``, in every schedule. Bytes moved (each operand once; A is re-read per column tile, B per row
tile; TMA changes who issues the copies, not the bytes): ``(M K + K N + M K2 + K2 N) * in_bytes + M N * out_bytes``
(+ ``M K`` for Q with MASK "a"; + ``M N`` per residual, Q with MASK "residual", gate, pre; + N for bias; with
SIGN_BITS ``M K / 8`` or ``M N / 8`` bytes in Q's place; + ``M N / 8`` bytes with STORE_SIGNS); split-K adds ``~(S +
2 sqrt(S)) M N`` fp32 partials written and read once, S = SPLIT_K (or the persistent schedule's splits).

Beside this file: the autotune candidates and their pruning (``fused_linear_configs.py``), the TMA pieces
(``_tma.py``) and the host wrapper with the autotuner (``fused_linear.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._cast import narrowed
from ._reduce import sum_slots_in_order
from ._signs import sign_passes, store_signs
from ._tma import descriptor, tma_dot
from .activations import apply, gradient


@triton.jit
def _epilogue(acc, row0, col0, tile_m, mask_m, N,
              bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr,
              stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
              stride_cm, stride_cn,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, MASK: tl.constexpr, GATE: tl.constexpr,
              STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr, WIDTH: tl.constexpr, SIGN_BITS: tl.constexpr,
              STORE_SIGNS: tl.constexpr):
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
            if SIGN_BITS:
                passes = sign_passes(mask_ptr + row0 * stride_qm, tile_m[:, None], (col0 + tile_n)[None, :],
                                     stride_qm, mask_mn)
                residual = tl.where(passes, residual, 0.0)
            else:
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
    if STORE_SIGNS:  # from C as stored, the values a backward that kept C would read
        store_signs(pre_ptr, acc.to(c_ptr.dtype.element_ty), row0, col0, tile_m, mask_m, N, stride_pm, WIDTH)


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
    EPILOGUE_SPLIT: tl.constexpr, SIGN_BITS: tl.constexpr, STORE_SIGNS: tl.constexpr,
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
        acc, rowsum = tma_dot(acc, rowsum, a_desc, b_desc, q_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_start,
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
                if SIGN_BITS == 1:  # Y's rows on m, its features on k
                    passes = sign_passes(mask_ptr + row0 * stride_qm, tile_m[:, None],
                                         (k_start + k * BLOCK_K + offs_k)[None, :], stride_qm,
                                         mask_m[:, None] & mask_k[None, :])
                    a = tl.where(passes, a, 0.0)
                elif SIGN_BITS == 2:  # Y's rows on k (A = dY^T), its features on m
                    passes = sign_passes(mask_ptr + (tl.cast(k_start, tl.int64) + k * BLOCK_K) * stride_qm,
                                         offs_k[None, :], (row0 + tile_m)[:, None], stride_qm,
                                         mask_m[:, None] & mask_k[None, :])
                    a = tl.where(passes, a, 0.0)
                else:
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
            acc, rowsum = tma_dot(acc, rowsum, sa_desc, sb_desc, sa_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0,
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
                      stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, BLOCK_N // 2,
                      SIGN_BITS, STORE_SIGNS)
            _epilogue(right, row0, col0 + BLOCK_N // 2, tile_m, mask_m, N, bias_ptr, res_ptr, mask_ptr, gate_ptr,
                      pre_ptr, c_ptr, stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm,
                      stride_pn, stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION,
                      BLOCK_N // 2, SIGN_BITS, STORE_SIGNS)
        else:
            _epilogue(acc, row0, col0, tile_m, mask_m, N, bias_ptr, res_ptr, mask_ptr, gate_ptr, pre_ptr, c_ptr,
                      stride_rm, stride_rn, stride_qm, stride_qk, stride_gm, stride_gn, stride_pm, stride_pn,
                      stride_cm, stride_cn, HAS_BIAS, HAS_RESIDUAL, MASK, GATE, STORE_PRE, ACTIVATION, BLOCK_N,
                      SIGN_BITS, STORE_SIGNS)
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
    # Packed sign bits (_signs.py): the masks read from them (1: Y's rows on m, 2: on k), C's written to pre_ptr.
    SIGN_BITS: tl.constexpr = 0, STORE_SIGNS: tl.constexpr = False,
):
    A_T: tl.constexpr = TMA_LAYOUT == "mk" or TMA_LAYOUT == "mn"  # A stored M-contiguous (A = g^T)
    B_T: tl.constexpr = TMA_LAYOUT == "kk" or TMA_LAYOUT == "mk"  # B stored K-contiguous (B = W^T)
    a_desc, b_desc, q_desc, sa_desc, sb_desc = a_ptr, b_ptr, mask_ptr, sa_ptr, sb_ptr
    if TMA:
        tl.static_assert(TMA_LAYOUT != "", "TMA schedules run only where tma_layout() qualifies the operands")
        tl.static_assert(SIGN_BITS == 0, "TMA schedules read a mask Q, not packed sign bits")
        a_desc = descriptor(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = descriptor(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
        if MASK == "a":
            q_desc = descriptor(mask_ptr, M, K, stride_qm, stride_qk, BLOCK_M, BLOCK_K, A_T)
        if HAS_SECOND:
            sa_desc = descriptor(sa_ptr, M, K2, stride_sam, stride_sak, BLOCK_M, BLOCK_K, A_T)
            sb_desc = descriptor(sb_ptr, K2, N, stride_sbk, stride_sbn, BLOCK_K, BLOCK_N, B_T)
    tl.static_assert(not (STORE_SIGNS and STORE_PRE), "the signs are written through pre_ptr")
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
                  EPILOGUE_SPLIT, SIGN_BITS, STORE_SIGNS)
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
              EPILOGUE_SPLIT, SIGN_BITS, STORE_SIGNS)
