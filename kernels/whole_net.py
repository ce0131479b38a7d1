"""Whole residual net in one kernel, for inference at small widths: activations never leave the chip.

Math, per tile of BLOCK_M rows (``IN``, ``H``, ``OUT`` features, each padded to a power of two >= 16 inside the
kernel: masked loads, padded columns forced to 0, no copies of the user's tensors):

    a   = relu(x Win^T + bin)                                  input projection
    for i in 0 .. NUM_BLOCKS - 1:                              residual blocks, weights of block i from L2
        h = relu(a W1[i]^T + b1[i])
        a = relu(h W2[i]^T + b2[i] + a)
    y   = a Wout^T + bout                                      output projection (no ReLU)

Activations are rounded to the input dtype between layers, as the block kernels and the eager net do.
Shapes: x (M, IN), Win (H, IN), W1/W2 stacked (NUM_BLOCKS, H, H) row-major, b1/b2 (NUM_BLOCKS, H),
Wout (OUT, H), y (M, OUT); x, y and the projection weights take any strides.
Grid: ``(cdiv(M, BLOCK_M),)``.
FLOPs: ``2 M (IN H + 2 NUM_BLOCKS H^2 + H OUT)``. Bytes: ``M (IN + OUT)`` elements of activations (x read
once, y written once) plus the weights, read once per row tile from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import next_power_of_2
from ._launch import CachedLauncher
from .whole_block_configs import WEIGHTS_ON_CHIP_WIDTH, padded_width

# (BLOCK_M, num_warps), compiled ahead of time for sm_90 and sm_80 in tests/test_kernels_aot.py: at hidden
# width 128, 64 rows on 4 warps spill.
CONFIGS = [(64, 4), (64, 8), (128, 8)]
INTERPRETER_BLOCK_M = 32


def configs(hidden_width: int) -> list[tuple[int, int]]:
    return [(64, 4), (128, 8)] if hidden_width <= 64 else [(64, 8), (128, 8)]


def _prune(candidates, named_args, **kwargs):
    allowed = set(configs({**named_args, **kwargs}["H_WIDTH"]))
    return [c for c in candidates if (c.kwargs["BLOCK_M"], c.num_warps) in allowed]


def fits(in_features: int, hidden: int, out_features: int, element_size: int) -> bool:
    """Whether the whole net runs in this kernel: every padded width within the block kernel's on-chip limit."""
    limit = WEIGHTS_ON_CHIP_WIDTH[element_size]
    return max(padded_width(in_features), padded_width(hidden), padded_width(out_features)) <= limit


@triton.jit
def _dense(a, w_ptr, b_ptr, stride_wn, stride_wk, K, N, K_WIDTH: tl.constexpr, N_WIDTH: tl.constexpr,
           INPUT_PRECISION: tl.constexpr):
    """``a W^T + b`` in fp32 for an on-chip ``a`` (BLOCK_M, K_WIDTH); W (N, K) read as a (K, N) tile."""
    ks = tl.arange(0, K_WIDTH)
    ns = tl.arange(0, N_WIDTH)
    wt = tl.load(w_ptr + ks[:, None] * stride_wk + ns[None, :] * stride_wn,
                 mask=(ks < K)[:, None] & (ns < N)[None, :], other=0.0)
    acc = tl.dot(a, wt, input_precision=INPUT_PRECISION)
    return acc + tl.load(b_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _relu_padded(acc, n, N_WIDTH: tl.constexpr):
    """ReLU, with the padded columns set to 0 (they hold 0 * inf = NaN where an input is infinite)."""
    ns = tl.arange(0, N_WIDTH)
    return tl.where((acc < 0) | (ns >= n)[None, :], 0.0, acc)


@triton.jit
def whole_net_forward_kernel(
    x_ptr, win_ptr, bin_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, wout_ptr, bout_ptr, y_ptr,
    M, IN, H, OUT, NUM_BLOCKS,
    stride_xm, stride_xk, stride_win_n, stride_win_k, stride_wout_n, stride_wout_k, stride_ym, stride_yn,
    M_BUCKET,  # autotune key only
    INPUT_PRECISION: tl.constexpr, IN_WIDTH: tl.constexpr, H_WIDTH: tl.constexpr, OUT_WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row0 = (tl.program_id(0) * BLOCK_M).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    mask_m = rows < M - row0
    ins = tl.arange(0, IN_WIDTH)
    x = tl.load(x_ptr + row0 * stride_xm + (rows[:, None] * stride_xm + ins[None, :] * stride_xk),
                mask=mask_m[:, None] & (ins < IN)[None, :], other=0.0)
    dtype = x.dtype
    a = _relu_padded(_dense(x, win_ptr, bin_ptr, stride_win_n, stride_win_k, IN, H, IN_WIDTH, H_WIDTH,
                            INPUT_PRECISION), H, H_WIDTH).to(dtype)
    square = H * H
    for i in range(NUM_BLOCKS):
        h = _relu_padded(_dense(a, w1_ptr + i * square, b1_ptr + i * H, H, 1, H, H, H_WIDTH, H_WIDTH,
                                INPUT_PRECISION), H, H_WIDTH).to(dtype)
        acc = _dense(h, w2_ptr + i * square, b2_ptr + i * H, H, 1, H, H, H_WIDTH, H_WIDTH, INPUT_PRECISION)
        a = _relu_padded(acc + a.to(tl.float32), H, H_WIDTH).to(dtype)
    y = _dense(a, wout_ptr, bout_ptr, stride_wout_n, stride_wout_k, H, OUT, H_WIDTH, OUT_WIDTH, INPUT_PRECISION)
    outs = tl.arange(0, OUT_WIDTH)
    tl.store(y_ptr + row0 * stride_ym + (rows[:, None] * stride_ym + outs[None, :] * stride_yn),
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (outs < OUT)[None, :])


whole_net_forward_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=1) for m, w in CONFIGS],
    key=["M_BUCKET", "IN", "H", "OUT", "NUM_BLOCKS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(whole_net_forward_kernel)
_launch_tuned = CachedLauncher(whole_net_forward_autotuned)
_launch_fixed = CachedLauncher(whole_net_forward_kernel)


def forward(x, w_in, b_in, w1, b1, w2, b2, w_out, b_out, *, out=None, config: tuple[int, int] | None = None):
    """``y`` of the net for 2-D ``x``; block parameters stacked: ``w1, w2 (B, H, H)``, ``b1, b2 (B, H)``,
    all with biases (as ``ResidualNet`` has). ``out`` may be given (any strides)."""
    M, in_features = x.shape
    hidden, out_features = w_in.shape[0], w_out.shape[0]
    if out is None:
        out = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
    args = (x, w_in, b_in, w1, b1, w2, b2, w_out, b_out, out, M, in_features, hidden, out_features, w1.shape[0],
            *x.stride(), *w_in.stride(), *w_out.stride(), *out.stride(), next_power_of_2(M))
    widths = {"INPUT_PRECISION": _common.input_precision(x), "IN_WIDTH": padded_width(in_features),
              "H_WIDTH": padded_width(hidden), "OUT_WIDTH": padded_width(out_features)}
    if config is None and _common.on_interpreter(x.device):
        config = (INTERPRETER_BLOCK_M, 4)
    with _common.launch_device(x.device):
        if config is None:
            _launch_tuned(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),), *args, **widths)
        else:
            block_m, warps = config
            _launch_fixed((triton.cdiv(M, block_m),), *args, **widths, BLOCK_M=block_m, num_warps=warps,
                          num_stages=1)
    return out
