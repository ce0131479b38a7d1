"""The whole residual block in one kernel each way, host side: ``forward`` and ``backward`` (one launch each), and
the forward's autotuner.

The kernels, with their math, shapes, bytes, FLOPs and grids: ``whole_block_forward.py`` and
``whole_block_backward.py``; their configurations and width limits (plain Python): ``whole_block_configs.py``.
"""

from __future__ import annotations

import torch
import triton

from ..activations import ACTIVATIONS
from . import _common, _reduce
from ._common import next_power_of_2
from ._launch import CachedLauncher
from ._signs import row_bytes
from .whole_block_backward import whole_block_backward_kernel
from .whole_block_configs import (
    ALL_FORWARD_CONFIGS,
    INTERPRETER_BLOCK_M,
    INTERPRETER_HIDDEN_CHUNK,
    WEIGHTS_ON_CHIP_WIDTH,
    BackwardConfig,
    ForwardConfig,
    backward_config,
    dx_share,
    padded_width,
    prune,
)
from .whole_block_forward import whole_block_forward_kernel

whole_block_forward_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c.block_m, "PROGRAMS_PER_SM": c.programs_per_sm,
                            "HIDDEN_CHUNK": c.hidden_chunk}, num_warps=c.warps, num_stages=c.stages)
             for c in ALL_FORWARD_CONFIGS],
    key=["M_BUCKET", "F", "HAS_B1", "HAS_B2", "STORE_SAVED", "STORE_SIGNS", "ACTIVATION", "FINAL_RELU",
         "INPUT_PRECISION", "WIDTH"],
    prune_configs_by={"early_config_prune": prune},
)(whole_block_forward_kernel)
_launch_forward_tuned = CachedLauncher(whole_block_forward_autotuned)
_launch_forward_fixed = CachedLauncher(whole_block_forward_kernel)
_launch_backward = CachedLauncher(whole_block_backward_kernel)


def forward(x, w1, b1, w2, b2, *, store_saved: bool, activation: str = "relu", final_relu: bool = True,
            out_dtype: torch.dtype | None = None, out=None, saved=None, config: tuple[int, ...] | None = None,
            store_signs: bool = False):
    """``(out, saved or None)`` of the identity-shortcut block for 2-D ``x`` of width ``F`` (padded, at most
    ``MAX_FORWARD_WIDTH``).

    ``saved`` is what backward needs of the hidden layer (``activations.saved_of``), in the weights' dtype; with
    ``store_signs`` (a recompute block, ``final_relu``, not ``store_saved``) it is the final ReLU's packed sign bits
    instead (``_signs.py``: uint8, ``(M, ceil(F / 8))``).
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
    if store_signs and saved is None:
        saved = torch.empty((M, row_bytes(F)), device=x.device, dtype=torch.uint8)
    if M == 0:
        return out, saved
    saved_arg = saved if saved is not None else out
    args = (x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, saved_arg, M, F,
            *x.stride(), *w1.stride(), *w2.stride(), *out.stride(), *saved_arg.stride(), next_power_of_2(M))
    flags = {"HAS_B1": b1 is not None, "HAS_B2": b2 is not None, "STORE_SAVED": store_saved,
             "STORE_SIGNS": store_signs, "ACTIVATION": activation,
             "FROM_OUTPUT": ACTIVATIONS[activation].from_output, "FINAL_RELU": final_relu,
             "INPUT_PRECISION": _common.input_precision(w1), "WIDTH": width}
    if config is None and _common.on_interpreter(x.device):
        streamed = width > WEIGHTS_ON_CHIP_WIDTH[w1.element_size()]
        config = ForwardConfig(INTERPRETER_BLOCK_M, 4, 0, INTERPRETER_HIDDEN_CHUNK if streamed else 0)
    sms = _common.multiprocessors(x.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)

    with _common.launch_device(x.device):
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
    return max(1, min(tiles, max_programs(device)))


def max_programs(device: torch.device) -> int:
    """The persistent backward's program count for many tiles: two per SM."""
    return 2 * _common.multiprocessors(device)


def backward(dout, out, saved, x, w1, w2, *, need_dx: bool, need_weights: bool, activation: str = "relu",
             final_relu: bool = True, dx_dtype: torch.dtype | None = None, dx=None,
             config: tuple[int, ...] | None = None, sign_bits: bool = False, recompute: bool = False, b1=None):
    """``(dx, dW1, db1, dW2, db2)`` (None where not asked) of the identity-shortcut block: one launch, the weight
    gradients summed over the persistent programs in slot order inside it and written in the weights' dtype.

    ``out`` is read only with ``final_relu`` (else it may be None); ``x`` only for the weight gradients. ``dout``
    and ``x`` may be wider than the weights (autocast); ``dx`` has ``dx_dtype`` (default ``dout``'s) or is given.
    ``config``: a ``BackwardConfig`` (or its leading fields) instead of ``backward_config``'s. ``sign_bits``: ``out``
    is the final ReLU's packed sign bits (``_signs.py``). ``recompute``: ``saved`` is None, the hidden layer is
    computed again on chip from ``x`` (then always given), ``w1`` and ``b1`` (or none).
    """
    M, F = dout.shape
    width = padded_width(F)
    if config is None:
        wide = max(x.element_size() if x is not None else 0, torch.finfo(dx_dtype or dout.dtype).bits // 8) > \
            w1.element_size()
        config = backward_config(width, w1.element_size(), wide, _common.family(dout.device).name, recompute)
        if _common.on_interpreter(dout.device):
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
        saved_arg = (b1 if b1 is not None else w1) if recompute else saved
        with _common.launch_device(dout.device), _reduce.reset_on_failure(counters if need_weights else None):
            _launch_backward(
                (programs,),
                dout, out_arg, saved_arg, x_arg, w1, w2, dx_arg, dw1, db1, dw2, db2, ws, counters, M, F,
                *dout.stride(), *out_arg.stride(), *_matrix_strides(saved_arg), *x_arg.stride(), *w1.stride(),
                *w2.stride(),
                *dx_arg.stride(), *_matrix_strides(dw1), *_matrix_strides(dw2), _reduce.group_size(partials),
                NEED_DX=need_dx, NEED_WEIGHTS=need_weights, ACTIVATION=activation,
                FROM_OUTPUT=ACTIVATIONS[activation].from_output, FINAL_RELU=final_relu,
                INPUT_PRECISION=_common.input_precision(w1), WIDTH=width, BLOCK_M=block_m, HIDDEN_CHUNK=chunk,
                DX_SHARE=share, SIGN_BITS=sign_bits and final_relu, RECOMPUTE=recompute,
                HAS_B1=recompute and b1 is not None, num_warps=warps, num_stages=1,
            )
    return dx, *grads


def _matrix_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, 0)
