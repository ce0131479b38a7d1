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

The kernels' launches are recorded by ``_plan_launches.py``, which lays out their arguments as their wrappers do;
their grids and row-count keys are here, beside the replay that calls them per launch.
"""

from __future__ import annotations

import operator

import torch
from triton import knobs as _knobs
from triton.runtime.driver import driver as _driver

from . import _common, _reduce
from . import fused_linear as fl
from . import whole_block as wb
from ._launch import _LAUNCHES as _COUNTS
from ._launch import _HookChain
from ._tma import ensure_scratch_allocator

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
            ensure_scratch_allocator()
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
        self.gpu = _common.is_gpu(device)
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


# ---- grids and row-count keys of the recorded launches (called per launch: here, beside the replay) ------------

def split_k_slices(rows: int, cols: int, sms: int, k: int) -> int:
    """Slices of K for a weight-gradient GEMM of ``rows x cols`` tiles over ``k`` (the batch): enough tiles to fill
    the GPU's ``sms``, each slice >= 1024 rows deep (a function of the exact batch size: a plan's family key)."""
    tiles = max(1, -(-rows // 128) * -(-cols // 128))
    want = max(1, 2 * sms // tiles)
    return max(1, min(want, k // 1024, 64))


def fused_linear_grid(m: int, n: int, rows_are_k: bool, split: int, sms: int, fixed: tuple | None, rows: int,
                      meta: dict) -> tuple[int, int]:
    """``fl.fused_linear``'s grid: ``fixed`` = (BLOCK_M, BLOCK_N, PERSISTENT) of a fixed config, else the
    autotuner's config in ``meta``; M is the call's rows unless they are K (a weight gradient)."""
    block_m, block_n, persistent = fixed or (meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"])
    tiles = -(-(m if rows_are_k else rows) // block_m) * -(-n // block_n)
    return fl.persistent_grid(tiles, split, sms) if persistent else (tiles, split)


def whole_block_forward_grid(sms: int, rows: int, meta: dict) -> tuple[int]:
    tiles = -(-rows // meta["BLOCK_M"])
    per_sm = meta["PROGRAMS_PER_SM"]
    return (min(tiles, per_sm * sms) if per_sm else tiles,)


def fixed_grid(programs: int, rows: int, meta: dict) -> tuple[int]:
    return (programs,)


def whole_block_programs(device: torch.device, block_m: int, rows: int) -> int:
    """The whole-block backward's program count for ``rows`` (its family key)."""
    return wb._programs(device, -(-rows // block_m))
