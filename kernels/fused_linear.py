"""The host side of the fused linear kernel (``fused_linear_kernel.py``, which documents the math, shapes, bytes,
FLOPs and grid): its autotuner, the launch grid, the split-K workspace and ``fused_linear``, the one call every
GEMM of the two-GEMM path makes.

The autotuner's candidates and prune hook come from ``fused_linear_configs.py``; the interpreter runs one fixed
small config instead (``INTERPRETER_CONFIG``).
"""

from __future__ import annotations

import functools

import torch
import triton

from ..activations import IDENTITY
from . import _common, _reduce
from ._common import next_power_of_2
from ._launch import CachedLauncher
from ._tma import ensure_scratch_allocator, tma_layout
from .fused_linear_configs import ALL_ENTRIES, INTERPRETER_CONFIG, persistent_grid, prune, schedule_constexprs
from .fused_linear_kernel import fused_linear_kernel


def _as_config(entry: tuple) -> triton.Config:
    block_m, block_n, block_k, stages, warps = entry[:5]
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
                          **schedule_constexprs(entry)}, num_stages=stages, num_warps=warps)


# TMA_LAYOUT is in the key (and, as a constexpr, in the launch cache's): a choice made where the operands qualify
# for TMA is never reused for a call where they do not.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "K2", "HAS_SECOND", "HAS_BIAS", "HAS_RESIDUAL", "MASK", "GATE",
                 "STORE_PRE", "ACTIVATION", "B_ACTIVATION", "HAS_ROWSUM", "SPLIT_K", "INPUT_PRECISION", "TMA_LAYOUT",
                 "SIGN_BITS", "STORE_SIGNS"]
fused_linear_autotuned = triton.autotune(
    configs=[_as_config(e) for e in ALL_ENTRIES],
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune},
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


def _grid(m: int, n: int, split_k: int, device: torch.device, block_m: int, block_n: int,
          persistent: bool) -> tuple[int, int]:
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return persistent_grid(tiles, split_k, _common.multiprocessors(device)) if persistent else (tiles, split_k)


@functools.lru_cache(maxsize=256)
def _split_k_sizes(m: int, n: int, split_k: int, config: tuple | None) -> tuple[int, int]:
    """(fp32 workspace elements, counters) of a split-K launch: the most any candidate tile needs."""
    slots, counters = _reduce.workspace_slots(split_k), _reduce.counters_needed(split_k)
    entries = [config] if config is not None else ALL_ENTRIES
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
    mask_bits: int = 0,
    signs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``C = epilogue(a @ b [+ sa @ sb])`` as ``fused_linear_kernel.py`` documents; returns ``(C, rowsum or None)``.

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
    fixed one); a "tma" schedule needs operands that qualify (``tma_layout``). ``mask_bits``: ``relu_mask`` is
    instead ``Y``'s packed sign bits (``_signs.py``, uint8 ``(rows of Y, ceil(features / 8))``) with ``Y``'s rows
    on the GEMM's m axis (1: ``a = dY``, or the residual) or its k axis (2: ``a = dY^T``). ``signs_out``: a uint8
    ``(M, ceil(N / 8))`` tensor that gets ``C``'s packed sign bits (a recompute block's final ReLU; not with
    ``pre_out``).
    """
    sa, sb = second if second is not None else (None, None)
    a, b, sa, sb, residual, relu_mask, gate = (_tile_safe(t) for t in (a, b, sa, sb, residual, relu_mask, gate))
    M, K = a.shape
    N = b.shape[1]
    K2 = sa.shape[1] if sa is not None else 0
    has_epilogue = (bias is not None or residual is not None or gate is not None or pre_out is not None or activation
                    or signs_out is not None)
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
        mask_bits = mask_bits if relu_mask is not None else 0
    if config is None and _common.on_interpreter(a.device):
        config = INTERPRETER_CONFIG
    ws = counters = c
    used_counters = None
    if split_k > 1:
        ws_elements, counter_count = _split_k_sizes(M, N, split_k, config)
        ws = torch.empty((ws_elements,), device=a.device, dtype=torch.float32)
        counters = used_counters = _reduce.arrival_counters(a.device, counter_count)
    mask = "none" if relu_mask is None else mask_on
    layout = ""
    if a.dtype == b.dtype and _common.family(a.device).tma and not mask_bits:  # TMA reads no bits
        layout = tma_layout(a, b, sa, sb, relu_mask if mask == "a" else None)
        if layout and _common.is_gpu(a.device):
            ensure_scratch_allocator()
    args = (
        a, b, sa if sa is not None else a, sb if sb is not None else b,
        bias if bias is not None else c, residual if residual is not None else c,
        relu_mask if relu_mask is not None else c, gate if gate is not None else c,
        pre_out if pre_out is not None else signs_out if signs_out is not None else c,
        c, sums if sums is not None else c, ws, counters,
        M, N, K, K2,
        *a.stride(), *b.stride(), *_strides(sa), *_strides(sb),
        *_strides(residual), *_strides(relu_mask), *_strides(gate),
        *_strides(pre_out if signs_out is None else signs_out), *c.stride(),
        _reduce.group_size(split_k), next_power_of_2(M), next_power_of_2(K),
    )
    flags = {
        "HAS_SECOND": sa is not None, "HAS_BIAS": bias is not None, "HAS_RESIDUAL": residual is not None,
        "MASK": mask, "GATE": gate_activation if gate is not None else IDENTITY,
        "STORE_PRE": pre_out is not None,
        "ACTIVATION": activation or IDENTITY, "B_ACTIVATION": b_activation or IDENTITY, "HAS_ROWSUM": rowsum,
        "SPLIT_K": split_k,
        "INPUT_PRECISION": _common.input_precision(a if a.element_size() <= b.element_size() else b),
        "TMA_LAYOUT": layout, "SIGN_BITS": mask_bits, "STORE_SIGNS": signs_out is not None,
    }
    with _common.launch_device(a.device), _reduce.reset_on_failure(used_counters):
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
