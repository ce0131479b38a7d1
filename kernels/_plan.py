"""Launch plans: a block's forward or backward for one call signature, recorded once and replayed per call.

The first call at a signature runs through a ``Recorder``: each allocation, torch op and kernel launch runs as it
is recorded (the launches through ``CachedLauncher``, so Triton binds, compiles and autotunes as usual) and joins a
list of ``Steps``. Later calls with the same signature (``fused_residual/plans.py`` keys them: dtypes, device,
widths, strides, alignment, the row count's class, what needs a gradient) replay the steps: allocate, launch, and
nothing else. What changes between such calls is only the tensors and the row count M, so a step holds

- an allocation: its shape with ``ROWS`` for M, dtype, device;
- a launch (``PreparedLaunch``): the kernel's arguments with every one but the tensors and the row count fixed,
  its grid as a function of M (and the autotuner's config), and, after its first launch, the compiled kernel
  that Triton chose (``CachedLauncher.entry``), launched directly as ``JITFunction.run`` would;
- a family of launches where a choice depends on the exact M (split-K slices, the whole-block backward's
  program count): one member per value, prepared when that value is first met;
- a torch op (the few the backward makes outside the kernels).

Triton's own path is taken for a launch with no compiled kernel (Triton's interpreter, a launch the cache
refused), and where a compiled launch would not do what Triton does: a launch hook is set (a profiler wants to see
the launch), the current device is not the tensors'. Triton's compilation knobs (``runtime.debug``,
``compilation.instrumentation_mode``, ...) are those of the recording: they change how a kernel is checked or
instrumented, not what it computes; after changing one at run time, ``fused_residual.plans.clear()`` makes the
next calls record again. Launches are counted like ``CachedLauncher``'s (``_launch.launch_counts``).

The kernels' arguments are laid out here as their wrappers (``fused_linear.fused_linear``,
``whole_block.forward`` / ``backward``) lay them out; ``tests/test_plans.py`` checks, launch by launch, that both
make the same launches.
"""

from __future__ import annotations

import operator

import torch
from triton import knobs as _knobs
from triton.runtime.driver import driver as _driver

from . import _reduce
from . import fused_linear as fl
from . import whole_block as wb
from ._common import capability, input_precision, is_gpu, multiprocessors, next_power_of_2, on_interpreter
from ._launch import _LAUNCHES as _COUNTS
from ._launch import _HookChain
from .activations import IDENTITY

ROWS = "rows"  # in a recorded shape: the call's row count
NONE = "none"  # a result that is None


class PreparedLaunch:
    """One launch: ``args = (tensors from registers, *pre, M, *post)``, grid ``grid(M, config)``."""

    __slots__ = ("launcher", "name", "gather", "pre", "post", "kwargs", "grid", "entry", "allocator", "counters")

    def __init__(self, launcher, slots, pre, post, kwargs, grid, allocator=False, counters=None):
        self.launcher, self.name, self.gather = launcher, launcher.name, operator.itemgetter(*slots)
        self.pre, self.post, self.kwargs, self.grid = tuple(pre), tuple(post), kwargs, grid
        self.entry = None
        self.allocator = allocator  # TMA descriptors need triton's allocator in this thread
        self.counters = counters  # the register of the arrival counters it uses, if any

    def __call__(self, rows, regs, stream):
        args = (*self.gather(regs), *self.pre, rows, *self.post)
        if self.allocator:
            fl._ensure_scratch_allocator()
        entry = self.entry
        if entry is None or stream is None:
            grid = self.grid
            with _reduce.reset_on_failure(None if self.counters is None else regs[self.counters]):
                self.launcher(lambda meta: grid(rows, meta), *args, **self.kwargs)
            if entry is None:
                self.entry = self.launcher.entry(args, self.kwargs)
            return
        _COUNTS[self.name] += 1
        run, function, packed_metadata, tail, meta = entry
        g = self.grid(rows, meta)
        run(g[0], g[1] if len(g) > 1 else 1, 1, stream, function, packed_metadata, None, None, *args, *tail)


class Alloc:
    """``regs[index] = torch.empty(shape, dtype, device)``, ``ROWS`` in ``shape`` standing for M."""

    __slots__ = ("index", "shape", "at", "dtype", "device")

    def __init__(self, index, shape, dtype, device):
        self.index, self.dtype, self.device = index, dtype, device
        self.at = shape.index(ROWS) if ROWS in shape else -1
        self.shape = tuple(shape)

    def __call__(self, rows, regs, stream):
        shape = self.shape
        if self.at >= 0:
            shape = (*shape[:self.at], rows, *shape[self.at + 1:])
        regs[self.index] = torch.empty(shape, dtype=self.dtype, device=self.device)


class Workspace:
    """``regs[index]`` = fp32 scratch for a launch's partial sums (split-K, the whole-block backward), which it
    writes before it reads them: on a compiled launch, one cached buffer per (device, stream), since launches on one
    stream run one after the other (as ``_reduce.arrival_counters``); a fresh one on Triton's path and while a CUDA
    graph is captured (from the graph's pool: a graph may be replayed on any stream)."""

    __slots__ = ("index", "shape", "elements", "device", "device_index")

    def __init__(self, index, shape, device):
        self.index, self.shape, self.device = index, tuple(shape), device
        self.elements = 1
        for n in shape:
            self.elements *= n
        self.device_index = device.index

    def __call__(self, rows, regs, stream):
        if stream is None or torch.cuda.is_current_stream_capturing():
            regs[self.index] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
            return
        key = (self.device_index, stream)
        buffer = _WORKSPACES.get(key)
        if buffer is None or buffer.numel() < self.elements:  # the launcher reads only its address
            buffer = _WORKSPACES[key] = torch.empty(self.elements, dtype=torch.float32, device=self.device)
        regs[self.index] = buffer


_WORKSPACES: dict[tuple, torch.Tensor] = {}


class Call:
    """``regs[index] = fn(*registers and constants)``: a torch op between launches."""

    __slots__ = ("index", "fn", "args")

    def __init__(self, index, fn, args):
        self.index, self.fn, self.args = index, fn, args  # args: (is_register, register or constant) pairs

    def __call__(self, rows, regs, stream):
        regs[self.index] = self.fn(*[regs[v] if is_reg else v for is_reg, v in self.args])


class Family:
    """Steps that depend on the exact row count through ``key(M)``: one list per key, recorded (and run) by
    ``make(key, rows, regs)`` on the call that first meets the key."""

    __slots__ = ("key", "make", "members")

    def __init__(self, key, make):
        self.key, self.make, self.members = key, make, {}

    def __call__(self, rows, regs, stream):
        k = self.key(rows)
        steps = self.members.get(k)
        if steps is None:
            self.members[k] = self.make(k, rows, regs)
            return
        _run(steps, rows, regs, stream)


class Steps:
    """A recorded forward or backward: ``steps(*inputs)`` returns the result registers for new inputs of the
    recorded signature (the first input's leading dim is M)."""

    __slots__ = ("steps", "blank", "results", "index", "gpu")

    def __init__(self, steps, n_inputs, n_regs, results, device):
        # Registers past the inputs, and one more that stays None (the ``NONE`` results).
        self.steps, self.blank, self.results = steps, [None] * (n_regs - n_inputs + 1), results
        self.gpu = is_gpu(device)
        self.index = device.index if device.index is not None else 0

    def stream(self):
        """The stream to launch on, or None where the launches must take Triton's own path."""
        if not self.gpu:
            return None
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        if not ((enter is None or (type(enter) is _HookChain and not enter.calls))
                and (leave is None or (type(leave) is _HookChain and not leave.calls))):
            return None
        active = _driver.active
        if active.get_current_device() != self.index:
            return None
        return active.get_current_stream(self.index)

    def __call__(self, *inputs):
        rows = inputs[0].shape[0]
        regs = [*inputs, *self.blank]
        _run(self.steps, rows, regs, self.stream())
        return tuple([regs[i] for i in self.results])


def _run(steps: list, rows: int, regs: list, stream) -> None:
    """Run ``steps``; allocations inline (a call's most frequent step: no frame of its own)."""
    for step in steps:
        if type(step) is Alloc:
            at = step.at
            shape = step.shape if at < 0 else (rows, *step.shape[1:]) if at == 0 else (
                *step.shape[:at], rows, *step.shape[at + 1:])
            regs[step.index] = _empty(shape, dtype=step.dtype, device=step.device)
        else:
            step(rows, regs, stream)


_empty = torch.empty


class Recorder:
    """Runs a forward or backward step by step and records the steps (``steps()``).

    ``inputs``: name -> tensor (or None) of this call; the names are the registers the steps read. Every method
    runs its step at once, on this call's tensors, and returns the register's name or tensor."""

    def __init__(self, inputs: dict, device: torch.device):
        self.names = list(inputs)
        self.regs = list(inputs.values())
        self.n_inputs = len(self.regs)
        self.rows = self.regs[0].shape[0]
        self.device = device
        self.steps: list = []
        self.frozen = [False]  # steps_for() was called: the register file is fixed (shared with family members)

    def __getitem__(self, name: str):
        return None if name == NONE else self.regs[self.names.index(name)]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def _new(self, name: str) -> int:
        if name in self.names:
            raise ValueError(f"register {name!r} recorded twice")
        self.names.append(name)
        self.regs.append(None)
        return len(self.regs) - 1

    def run(self, step) -> None:
        self.steps.append(step)
        step(self.rows, self.regs, None)

    def empty(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        self.run(Alloc(self._new(name), shape, dtype, self.device))
        return self[name]

    def workspace(self, name: str, shape: tuple) -> torch.Tensor:
        """fp32 scratch a launch writes before it reads (``Workspace``)."""
        self.run(Workspace(self._new(name), shape, self.device))
        return self[name]

    def call(self, name: str, fn, *args) -> torch.Tensor:
        """``name = fn(*args)``, each arg a register's name (str) or a constant."""
        pairs = tuple((True, self.index(a)) if isinstance(a, str) else (False, a) for a in args)
        self.run(Call(self._new(name), fn, pairs))
        return self[name]

    def family(self, key, make) -> None:
        """Steps chosen by ``key(M)``: ``make(key, recorder)`` records them for each key, over the registers of the
        call that first meets it. Their new registers must have the same names for every key."""
        names, device, frozen = self.names, self.device, self.frozen  # not self: its registers must not live on

        def member(k, rows, regs):
            sub = _Sub(names, regs, rows, device, frozen[0])
            make(k, sub)
            return sub.steps

        self.run(Family(key, member))

    def steps_for(self, results: tuple[str, ...]) -> Steps:
        """The recorded steps, returning the registers named by ``results`` (``NONE``: None)."""
        self.frozen[0] = True
        n = len(self.regs)
        steps = Steps(self.steps, self.n_inputs, n, [n if r == NONE else self.index(r) for r in results], self.device)
        self.regs = []  # this call's tensors belong to it alone
        return steps


class _Sub(Recorder):
    """Records a family member into its own list, over one call's registers."""

    def __init__(self, names: list, regs: list, rows: int, device: torch.device, frozen: bool):  # noqa: D107
        self.names, self.regs, self.rows, self.device, self.steps = names, regs, rows, device, []
        self.frozen = frozen

    def _new(self, name: str) -> int:
        if name in self.names:  # a later member: the register the first one named
            return self.names.index(name)
        if self.frozen:
            raise ValueError(f"register {name!r}: a family's members must name the same registers")
        return Recorder._new(self, name)


# ---- the kernels' launches, laid out as their wrappers lay them out ---------------------------------------------

def split_k_slices(rows: int, cols: int, sms: int, k: int) -> int:
    """Slices of K for a weight-gradient GEMM of ``rows x cols`` tiles over ``k`` (the batch): enough tiles to fill
    the GPU's ``sms``, each slice >= 1024 rows deep (a function of the exact batch size: a plan's family key)."""
    tiles = max(1, -(-rows // 128) * -(-cols // 128))
    want = max(1, 2 * sms // tiles)
    return max(1, min(want, k // 1024, 64))


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
                 out_dtype: torch.dtype | None = None) -> None:
    """Record ``fl.fused_linear`` (same operands and meaning) into register ``out_name`` (and ``rowsum``, the row
    sums' register). Operands are register names or ``(name, True)`` for a transpose; ``rows_in``: whether M is
    the GEMM's "m" (a forward: rows of a) or its "k" (a weight gradient: a = g^T); ``split_k``: slices as a
    function of M (weight gradients), recorded as a family."""
    operands = {"a": a, "b": b, "sa": second[0] if second else None, "sb": second[1] if second else None,
                "bias": bias, "residual": residual, "mask": relu_mask, "gate": gate, "pre": pre_out}
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
            views["mask"], relu_mask = (None, None), None
    config = fl.INTERPRETER_CONFIG if on_interpreter(device) else None
    mask = "none" if relu_mask is None else mask_on
    layout = ""
    if a_t.dtype == b_t.dtype and capability(device)[0] >= 9:
        layout = fl.tma_layout(a_t, b_t, sa_t, sb_t, views["mask"][1] if mask == "a" else None)
    has_bias = bias is not None
    flags = {
        "HAS_SECOND": sa_t is not None, "HAS_BIAS": has_bias, "HAS_RESIDUAL": residual is not None,
        "MASK": mask, "GATE": gate_activation if gate is not None else IDENTITY, "STORE_PRE": pre_out is not None,
        "ACTIVATION": activation or IDENTITY, "B_ACTIVATION": b_activation or IDENTITY, "HAS_ROWSUM": bool(rowsum),
        "INPUT_PRECISION": input_precision(a_t if a_t.element_size() <= b_t.element_size() else b_t),
        "TMA_LAYOUT": layout,
    }
    # Tensor slots in the kernel's order; an absent operand reads C (as in the wrapper).
    slot_names = [a_name, b_name, sa_name or a_name, sb_name or b_name,
                  *(views[k][0] or out_name for k in ("bias", "residual", "mask", "gate", "pre")), out_name,
                  rowsum or out_name]
    strides = (*a_t.stride(), *b_t.stride(), *_strides(sa_t), *_strides(sb_t), *_strides(views["residual"][1]),
               *_strides(views["mask"][1]), *_strides(views["gate"][1]), *_strides(views["pre"][1]), *c.stride())
    sms = multiprocessors(device)
    allocator = bool(layout) and is_gpu(device)

    def record(split: int, sub: Recorder) -> None:
        names = list(slot_names)
        ws_name = counters_name = out_name
        if split > 1:
            ws_elements, counter_count = fl._split_k_sizes(M, N, split, config)
            ws_name, counters_name = f"{out_name}.ws", f"{out_name}.counters"
            sub.workspace(ws_name, (ws_elements,))
            sub.call(counters_name, _reduce.arrival_counters, device, counter_count)
        names += [ws_name, counters_name]
        # The int arguments: M, N, K, K2, strides, the reduction group, M_BUCKET, K_BUCKET; the call's rows are M
        # (a forward) or K (a weight gradient).
        ints = (M, N, K, K2, *strides, _reduce.group_size(split), next_power_of_2(M), next_power_of_2(K))
        at = 0 if rows_in == "m" else 2
        kwargs = {**flags, "SPLIT_K": split}
        if config is None:
            def grid(rows, meta, n=N, m=M, k_rows=rows_in == "k"):
                tiles = -(-(m if k_rows else rows) // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])
                return fl.persistent_grid(tiles, split, sms) if meta["PERSISTENT"] else (tiles, split)
        else:
            block_m, block_n, block_k, stages, warps = config[:5]
            schedule = fl.schedule_constexprs(config)
            kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, **schedule,
                          num_stages=stages, num_warps=warps)
            persistent = schedule.get("PERSISTENT", False)

            def grid(rows, meta, n=N, m=M, k_rows=rows_in == "k"):
                tiles = -(-(m if k_rows else rows) // block_m) * -(-n // block_n)
                return fl.persistent_grid(tiles, split, sms) if persistent else (tiles, split)
        sub.run(PreparedLaunch(fl._launch_tuned if config is None else fl._launch_fixed,
                               [sub.index(n) for n in names], ints[:at], ints[at + 1:], kwargs, grid, allocator,
                               sub.index(counters_name) if split > 1 else None))

    if split_k is None:
        record(1, rec)
    else:
        rec.family(split_k, record)


def whole_block_forward(rec: Recorder, out_name: str, saved_name: str | None, x: str, w1: str, b1: str | None,
                        w2: str, b2: str | None, *, activation: str, final_relu: bool, out_dtype: torch.dtype) -> None:
    """Record ``wb.forward`` (``store_saved`` where ``saved_name`` is given) into the named registers."""
    xt, w1t, w2t = rec[x], rec[w1], rec[w2]
    F = xt.shape[1]
    width = wb.padded_width(F)
    out = rec.empty(out_name, (ROWS, F), out_dtype)
    saved = rec.empty(saved_name, (ROWS, F), w1t.dtype) if saved_name else None
    saved_arg = saved if saved is not None else out
    flags = {"HAS_B1": b1 is not None, "HAS_B2": b2 is not None, "STORE_SAVED": saved is not None,
             "ACTIVATION": activation, "FINAL_RELU": final_relu, "INPUT_PRECISION": input_precision(w1t),
             "WIDTH": width}
    post = (F, *xt.stride(), *w1t.stride(), *w2t.stride(), *out.stride(), *saved_arg.stride(),
            next_power_of_2(rec.rows))
    slots = [rec.index(n) for n in (x, w1, b1 or w1, w2, b2 or w2, out_name, saved_name or out_name)]
    sms = multiprocessors(rec.device)
    if on_interpreter(rec.device):
        streamed = width > wb.WEIGHTS_ON_CHIP_WIDTH[w1t.element_size()]
        config = wb.ForwardConfig(wb.INTERPRETER_BLOCK_M, 4, 0, wb.INTERPRETER_HIDDEN_CHUNK if streamed else 0)
        meta = {"BLOCK_M": config.block_m, "PROGRAMS_PER_SM": config.programs_per_sm,
                "HIDDEN_CHUNK": config.hidden_chunk}
        kwargs = {**flags, **meta, "num_warps": config.warps, "num_stages": config.stages}
        launcher = wb._launch_forward_fixed
    else:
        kwargs, launcher = flags, wb._launch_forward_tuned

    def grid(rows, meta):
        tiles = -(-rows // meta["BLOCK_M"])
        per_sm = meta["PROGRAMS_PER_SM"]
        return (min(tiles, per_sm * sms) if per_sm else tiles,)

    rec.run(PreparedLaunch(launcher, slots, (), post, kwargs, grid))


def whole_block_backward(rec: Recorder, dout: str, out: str | None, saved: str, x: str | None, w1: str, w2: str,
                         *, need_dx: bool, need_weights: bool, activation: str, final_relu: bool,
                         dx_dtype: torch.dtype) -> None:
    """Record ``wb.backward`` into registers ``dx`` (if ``need_dx``) and ``dw1, db1, dw2, db2`` (if
    ``need_weights``). Its program count, and so its grid, reduction group and workspace, follow the exact M:
    recorded as a family keyed by the program count."""
    dout_t, w1t = rec[dout], rec[w1]
    xt = rec[x] if x is not None else None
    F = dout_t.shape[1]
    width = wb.padded_width(F)
    wide = max(xt.element_size() if xt is not None else 0, torch.finfo(dx_dtype).bits // 8) > w1t.element_size()
    config = wb.backward_config(width, w1t.element_size(), wide)
    if on_interpreter(rec.device):
        config = config._replace(block_m=wb.INTERPRETER_BLOCK_M, warps=4)
    block_m, warps, chunk = wb.BackwardConfig(*config)
    share = wb.dx_share(width, chunk) if chunk else 1
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
    flags = {"NEED_DX": need_dx, "NEED_WEIGHTS": need_weights, "ACTIVATION": activation, "FINAL_RELU": final_relu,
             "INPUT_PRECISION": input_precision(w1t), "WIDTH": width, "BLOCK_M": block_m, "HIDDEN_CHUNK": chunk,
             "DX_SHARE": share, "num_warps": warps, "num_stages": 1}

    def programs_of(rows: int) -> int:
        return wb._programs(device, -(-rows // block_m))

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
            sub.call(counters, _reduce.arrival_counters, device, reductions * _reduce.counters_needed(partials))
        names = (dout, out_name, saved, x_name, w1, w2, dx_name, *grads, ws, counters)
        t = {n: sub[n] for n in names}
        post = (F, *t[dout].stride(), *t[out_name].stride(), *t[saved].stride(), *t[x_name].stride(),
                *t[w1].stride(), *t[w2].stride(), *t[dx_name].stride(), *wb._matrix_strides(t[grads[0]]),
                *wb._matrix_strides(t[grads[2]]), _reduce.group_size(partials))
        sub.run(PreparedLaunch(wb._launch_backward, [sub.index(n) for n in names], (), post, flags,
                               lambda rows, meta, n=launched: (n,), counters=sub.index(counters) if need_weights
                               else None))

    rec.family(programs_of, record)
