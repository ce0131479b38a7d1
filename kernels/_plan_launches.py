"""The kernels' launches as recorded steps (``_plan.py``), their arguments laid out as the kernels' wrappers
(``fused_linear.fused_linear``, ``whole_block.forward`` / ``backward``) lay them out; ``tests/test_plan_launches.py``
checks, launch by launch, that both make the same launches. Beside them, the grids' forms and the row-count keys
that the replay evaluates per call with arithmetic alone.
"""

from __future__ import annotations

import functools

import torch

from ..activations import ACTIVATIONS, IDENTITY
from . import _common, _reduce
from . import fused_linear as fl
from . import whole_block as wb
from . import whole_block_configs as wbc
from ._common import next_power_of_2
from ._plan import ROWS, PreparedLaunch, Recorder, RowsKey
from ._signs import row_bytes


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0)


def _view(rec: Recorder, operand):
    """``(register, tensor as the kernel reads it)`` of an operand: a register name, or ``(name, True)`` for the
    register's transpose (the same data pointer, strides swapped)."""
    if operand is None:
        return None, None
    name, transposed = (operand, False) if isinstance(operand, str) else operand
    t = rec[name]
    return name, (t.t() if transposed else t)


def _tile_safe(rec: Recorder, copy: str, operand):
    """``_view``'s pair, with a row-major copy (register ``copy``) in the rare case that a stride is too large for
    int32 in-tile offsets (``fl._tile_safe``)."""
    name, t = _view(rec, operand)
    if t is None or max(t.stride(), default=0) < fl._MAX_STRIDE:
        return name, t
    return copy, rec.call(copy, _row_major, name, not isinstance(operand, str))


def _row_major(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return (t.t() if transposed else t).contiguous()


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _zero_columns(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An (M, 1) operand of zeros for a GEMM with an empty K: M is ``t``'s rows (its columns, transposed)."""
    return t.new_zeros((t.shape[1] if transposed else t.shape[0], 1))


def fused_linear(rec: Recorder, out_name: str, a, b, *, rows_in: str = "m", second=None, bias=None, residual=None,
                 relu_mask=None, mask_on: str = "a", gate=None, gate_activation: str = "relu", activation=None,
                 pre_out=None, b_activation=None, rowsum: str | None = None, split_k=None,
                 out_dtype: torch.dtype | None = None, mask_bits: int = 0, signs_out: str | None = None) -> None:
    """Record ``fl.fused_linear`` (same operands and meaning) into register ``out_name`` (and ``rowsum``, the row
    sums' register). Operands are register names or ``(name, True)`` for a transpose; ``rows_in``: whether M is
    the GEMM's "m" (a forward: rows of a) or its "k" (a weight gradient: a = g^T); ``split_k``: slices as a
    function of M (a ``RowsKey``; weight gradients only), recorded as a family."""
    operands = {"a": a, "b": b, "sa": second[0] if second else None, "sb": second[1] if second else None,
                "bias": bias, "residual": residual, "mask": relu_mask, "gate": gate,
                "pre": pre_out if signs_out is None else signs_out}
    views = {k: _tile_safe(rec, f"{out_name}.{k}", op) for k, op in operands.items()}
    (a_name, a_t), (b_name, b_t), (sa_name, sa_t), (sb_name, sb_t) = (views[k] for k in ("a", "b", "sa", "sb"))
    M, K = a_t.shape
    N = b_t.shape[1]
    K2 = sa_t.shape[1] if sa_t is not None else 0
    out_dtype = out_dtype or a_t.dtype
    device = rec.device
    rows_shape = (ROWS, N) if rows_in == "m" else (M, N)
    c = rec.empty(out_name, rows_shape, out_dtype)
    if rowsum:
        rec.empty(rowsum, rows_shape[:1], out_dtype)
    if M == 0 or N == 0:
        return
    if K == 0 and K2 == 0:
        # No K loop at all: the accumulator is 0 and the epilogue alone decides (as the wrapper does it).
        a_name, b_name = f"{out_name}.zero_a", f"{out_name}.zero_b"
        a_t = rec.call(a_name, _zero_columns, operands["a"] if isinstance(operands["a"], str) else operands["a"][0],
                       rows_in == "k")
        b_t = rec.call(b_name, _zeros, (1, N), b_t.dtype, device)
        K = 1
        if mask_on != "residual":
            views["mask"], relu_mask, mask_bits = (None, None), None, 0
    config = fl.INTERPRETER_CONFIG if _common.on_interpreter(device) else None
    mask = "none" if relu_mask is None else mask_on
    layout = ""
    if a_t.dtype == b_t.dtype and _common.family(device).tma and not mask_bits:  # TMA reads no bits
        layout = fl.tma_layout(a_t, b_t, sa_t, sb_t, views["mask"][1] if mask == "a" else None)
    has_bias = bias is not None
    flags = {
        "HAS_SECOND": sa_t is not None, "HAS_BIAS": has_bias, "HAS_RESIDUAL": residual is not None,
        "MASK": mask, "GATE": gate_activation if gate is not None else IDENTITY, "STORE_PRE": pre_out is not None,
        "ACTIVATION": activation or IDENTITY, "B_ACTIVATION": b_activation or IDENTITY, "HAS_ROWSUM": bool(rowsum),
        "INPUT_PRECISION": _common.input_precision(a_t if a_t.element_size() <= b_t.element_size() else b_t),
        "TMA_LAYOUT": layout, "SIGN_BITS": mask_bits, "STORE_SIGNS": signs_out is not None,
    }
    # Tensor slots in the kernel's order; an absent operand reads C (as in the wrapper).
    slot_names = [a_name, b_name, sa_name or a_name, sb_name or b_name,
                  *(views[k][0] or out_name for k in ("bias", "residual", "mask", "gate", "pre")), out_name,
                  rowsum or out_name]
    strides = (*a_t.stride(), *b_t.stride(), *_strides(sa_t), *_strides(sb_t), *_strides(views["residual"][1]),
               *_strides(views["mask"][1]), *_strides(views["gate"][1]), *_strides(views["pre"][1]), *c.stride())
    sms = _common.multiprocessors(device)
    allocator = bool(layout) and _common.is_gpu(device)

    def record(split: int, sub: Recorder) -> None:
        names = list(slot_names)
        ws_name = counters_name = out_name
        if split > 1:
            ws_elements, counter_count = fl._split_k_sizes(M, N, split, config)
            ws_name, counters_name = f"{out_name}.ws", f"{out_name}.counters"
            sub.workspace(ws_name, (ws_elements,))
            sub.counters(counters_name, counter_count)
        names += [ws_name, counters_name]
        # The int arguments: M, N, K, K2, strides, the reduction group, M_BUCKET, K_BUCKET; the call's rows are M
        # (a forward) or K (a weight gradient).
        ints = (M, N, K, K2, *strides, _reduce.group_size(split), next_power_of_2(M), next_power_of_2(K))
        at = 0 if rows_in == "m" else 2
        kwargs = {**flags, "SPLIT_K": split}
        fixed = None
        if config is not None:
            block_m, block_n, block_k, stages, warps = config[:5]
            schedule = fl.schedule_constexprs(config)
            kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, **schedule,
                          num_stages=stages, num_warps=warps)
            fixed = (block_m, block_n, schedule.get("PERSISTENT", False))
        grid = functools.partial(fused_linear_grid, M, N, rows_in == "k", split, sms, fixed)
        sub.run(PreparedLaunch(fl._launch_tuned if config is None else fl._launch_fixed,
                               [sub.index(n) for n in names], ints[:at], ints[at + 1:], kwargs, grid, allocator,
                               sub.index(counters_name) if split > 1 else None))

    if split_k is None:
        record(1, rec)
    else:
        rec.family(split_k, record)


def whole_block_forward(rec: Recorder, out_name: str, saved_name: str | None, x: str, w1: str, b1: str | None,
                        w2: str, b2: str | None, *, activation: str, final_relu: bool, out_dtype: torch.dtype,
                        store_signs: bool = False) -> None:
    """Record ``wb.forward`` (``store_saved`` where ``saved_name`` is given, or ``store_signs`` into it) into the
    named registers."""
    xt, w1t, w2t = rec[x], rec[w1], rec[w2]
    F = xt.shape[1]
    width = wbc.padded_width(F)
    out = rec.empty(out_name, (ROWS, F), out_dtype)
    saved = None
    if saved_name:
        saved = (rec.empty(saved_name, (ROWS, row_bytes(F)), torch.uint8) if store_signs
                 else rec.empty(saved_name, (ROWS, F), w1t.dtype))
    saved_arg = saved if saved is not None else out
    flags = {"HAS_B1": b1 is not None, "HAS_B2": b2 is not None,
             "STORE_SAVED": saved is not None and not store_signs, "STORE_SIGNS": store_signs,
             "ACTIVATION": activation, "FROM_OUTPUT": ACTIVATIONS[activation].from_output, "FINAL_RELU": final_relu,
             "INPUT_PRECISION": _common.input_precision(w1t), "WIDTH": width}
    post = (F, *xt.stride(), *w1t.stride(), *w2t.stride(), *out.stride(), *saved_arg.stride(),
            next_power_of_2(rec.rows))
    slots = [rec.index(n) for n in (x, w1, b1 or w1, w2, b2 or w2, out_name, saved_name or out_name)]
    sms = _common.multiprocessors(rec.device)
    if _common.on_interpreter(rec.device):
        streamed = width > wbc.WEIGHTS_ON_CHIP_WIDTH[w1t.element_size()]
        config = wbc.ForwardConfig(wbc.INTERPRETER_BLOCK_M, 4, 0, wbc.INTERPRETER_HIDDEN_CHUNK if streamed else 0)
        meta = {"BLOCK_M": config.block_m, "PROGRAMS_PER_SM": config.programs_per_sm,
                "HIDDEN_CHUNK": config.hidden_chunk}
        kwargs = {**flags, **meta, "num_warps": config.warps, "num_stages": config.stages}
        launcher = wb._launch_forward_fixed
    else:
        kwargs, launcher = flags, wb._launch_forward_tuned

    rec.run(PreparedLaunch(launcher, slots, (), post, kwargs, functools.partial(whole_block_forward_grid, sms)))


def whole_block_backward(rec: Recorder, dout: str, out: str | None, saved: str | None, x: str | None, w1: str,
                         w2: str, *, need_dx: bool, need_weights: bool, activation: str, final_relu: bool,
                         dx_dtype: torch.dtype, sign_bits: bool = False, b1: str | None = None) -> None:
    """Record ``wb.backward`` into registers ``dx`` (if ``need_dx``) and ``dw1, db1, dw2, db2`` (if
    ``need_weights``). Its program count, and so its grid, reduction group and workspace, follow the exact M:
    recorded as a family keyed by the program count. ``saved`` None: ``recompute`` (with ``b1``'s register or
    None); ``sign_bits``: ``out`` names the packed sign bits."""
    recompute = saved is None
    dout_t, w1t = rec[dout], rec[w1]
    xt = rec[x] if x is not None else None
    F = dout_t.shape[1]
    width = wbc.padded_width(F)
    wide = max(xt.element_size() if xt is not None else 0, torch.finfo(dx_dtype).bits // 8) > w1t.element_size()
    config = wbc.backward_config(width, w1t.element_size(), wide, _common.family(rec.device).name, recompute)
    if _common.on_interpreter(rec.device):
        config = config._replace(block_m=wbc.INTERPRETER_BLOCK_M, warps=4)
    block_m, warps, chunk = wbc.BackwardConfig(*config)
    share = wbc.dx_share(width, chunk) if chunk else 1
    device = rec.device
    if need_dx:
        rec.empty("dx", (ROWS, F), dx_dtype)
    if need_weights:
        for name, shape in (("dw1", (F, F)), ("db1", (F,)), ("dw2", (F, F)), ("db2", (F,))):
            rec.empty(name, shape, w1t.dtype)
    out_name = out if final_relu else dout
    x_name = x if x is not None else dout
    dx_name = "dx" if need_dx else dout
    grads = ("dw1", "db1", "dw2", "db2") if need_weights else (dout,) * 4
    flags = {"NEED_DX": need_dx, "NEED_WEIGHTS": need_weights, "ACTIVATION": activation,
             "FROM_OUTPUT": ACTIVATIONS[activation].from_output, "FINAL_RELU": final_relu,
             "INPUT_PRECISION": _common.input_precision(w1t), "WIDTH": width, "BLOCK_M": block_m, "HIDDEN_CHUNK": chunk,
             "DX_SHARE": share, "SIGN_BITS": sign_bits and final_relu, "RECOMPUTE": recompute,
             "HAS_B1": recompute and b1 is not None, "num_warps": warps, "num_stages": 1}
    saved = (b1 or w1) if recompute else saved  # the recompute reads b1 there

    def record(programs: int, sub: Recorder) -> None:
        if chunk:
            partials = max(1, programs // (share + width // chunk))
            roles = share * need_dx + (width // chunk) * need_weights
            launched, reductions, slot = roles * partials, width // chunk, 2 * chunk * width + chunk + width
        else:
            partials, launched, reductions, slot = programs, programs, 1, 2 * width * width + 2 * width
        ws = counters = dout
        if need_weights:
            ws, counters = "ws", "counters"
            sub.workspace(ws, (reductions * _reduce.workspace_slots(partials), slot))
            sub.counters(counters, reductions * _reduce.counters_needed(partials))
        names = (dout, out_name, saved, x_name, w1, w2, dx_name, *grads, ws, counters)
        t = {n: sub[n] for n in names}
        post = (F, *t[dout].stride(), *t[out_name].stride(), *wb._matrix_strides(t[saved]), *t[x_name].stride(),
                *t[w1].stride(), *t[w2].stride(), *t[dx_name].stride(), *wb._matrix_strides(t[grads[0]]),
                *wb._matrix_strides(t[grads[2]]), _reduce.group_size(partials))
        sub.run(PreparedLaunch(wb._launch_backward, [sub.index(n) for n in names], (), post, flags,
                               functools.partial(fixed_grid, launched),
                               counters=sub.index(counters) if need_weights else None))

    rec.family(whole_block_programs(device, block_m), record)


# ---- grids and row-count keys of the recorded launches: fixed per config, arithmetic on M per call --------------

def split_k_slices(rows: int, cols: int, sms: int) -> RowsKey:
    """Slices of K for a weight-gradient GEMM of ``rows x cols`` tiles over K = the batch M (a plan's family key):
    enough tiles to fill the GPU's ``sms``, each slice >= 1024 rows deep, at most 64."""
    tiles = max(1, -(-rows // 128) * -(-cols // 128))
    return RowsKey(0, 1024, min(max(1, 2 * sms // tiles), 64))


MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on a grid's x dimension: no cap


def fused_linear_grid(m: int, n: int, rows_are_k: bool, split: int, sms: int, fixed: tuple | None,
                      meta: dict) -> tuple[int, int, int, int]:
    """The form of ``fl.fused_linear``'s grid: ``fixed`` = (BLOCK_M, BLOCK_N, PERSISTENT) of a fixed config, else
    the autotuner's config in ``meta``; M is the call's rows unless they are K (a weight gradient: a fixed grid).
    Split-K slices only for a weight gradient (a persistent grid's slices would depend on M)."""
    block_m, block_n, persistent = fixed or (meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"])
    columns = -(-n // block_n)
    if rows_are_k:
        tiles = -(-m // block_m) * columns
        g0, g1 = fl.persistent_grid(tiles, split, sms) if persistent else (tiles, split)
        return 0, 0, g0, g1
    if split != 1:
        raise ValueError("split-K over the rows' dimension: only weight gradients (rows are K) split K")
    # persistent_grid(tiles, 1, sms) = (min(tiles, sms), 1)
    return block_m, columns, max(1, sms) if persistent else MAX_PROGRAMS, 1


def whole_block_forward_grid(sms: int, meta: dict) -> tuple[int, int, int, int]:
    per_sm = meta["PROGRAMS_PER_SM"]
    return meta["BLOCK_M"], 1, per_sm * sms if per_sm else MAX_PROGRAMS, 1


def fixed_grid(programs: int, meta: dict) -> tuple[int, int, int, int]:
    return 0, 0, programs, 1


def whole_block_programs(device: torch.device, block_m: int) -> RowsKey:
    """The whole-block backward's program count for M rows (its family key): one per tile of ``block_m`` rows, at
    most ``wb.max_programs``."""
    return RowsKey(block_m - 1, block_m, wb.max_programs(device))
