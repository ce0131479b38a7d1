"""Launch plans: a block's forward or backward for one call signature, recorded once and replayed per call.

The first call at a signature runs through a ``Recorder``: each allocation, torch op and kernel launch runs as it
is recorded (the launches through ``CachedLauncher``, so Triton binds, compiles and autotunes as usual) and joins a
list of ``Steps``. Later calls with the same signature (``fused_residual/plans.py`` keys them: dtypes, device,
widths, strides, alignment, the row count's class, what needs a gradient) replay the steps: allocate, launch, and
nothing else. What changes between such calls is only the tensors and the row count M, so a step holds

- an allocation: its shape with ``ROWS`` for M, dtype, device;
- a launch (``PreparedLaunch``): the kernel's arguments with every one but the tensors and the row count fixed,
  its grid as a function of M (arithmetic on a form fixed by the autotuner's config), and, after its first
  launch, the compiled kernel that Triton chose (``CachedLauncher.entry``), launched as ``JITFunction.run``
  would: through Triton's C launcher directly where ``_direct.py`` proves that is the call Triton's Python
  launcher makes, else through that launcher;
- a family of launches where a choice depends on the exact M (split-K slices, the whole-block backward's
  program count, a ``RowsKey``): one member per value, prepared when that value is first met;
- cached scratch (``Workspace``, ``Counters``: one buffer per device and stream, fresh ones under CUDA-graph
  capture) and a torch op (the few the backward makes outside the kernels).

Once every launch of a list has its compiled kernel, the list runs as one generated function (``_replay.py``:
each step's ``emit`` writes out what its ``__call__`` does). Triton's own path is taken, step by step and inside
the tensors' device, for a launch with no compiled kernel (Triton's interpreter, a launch the cache refused), and
where a compiled launch would not do what Triton does: a launch hook is set (a profiler wants to see the launch),
the current device is not the tensors'. Triton's compilation knobs (``runtime.debug``,
``compilation.instrumentation_mode``, ...) are those of the recording: they change how a kernel is checked or
instrumented, not what it computes; after changing one at run time, ``fused_residual.plans.clear()`` makes the
next calls record again. Launches are counted like ``CachedLauncher``'s (``_launch.launch_counts``).

The kernels' launches are recorded by ``_plan_launches.py``, which lays out their arguments as their wrappers do,
with their grids' forms and row-count keys.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from triton import knobs as _knobs
from triton.runtime import _allocation
from triton.runtime.driver import driver as _driver

from . import _common, _reduce, _replay
from ._direct import direct_launch
from ._launch import _LAUNCHES as _COUNTS
from ._launch import _HookChain
from ._tma import ensure_scratch_allocator

ROWS = "rows"  # in a recorded shape: the call's row count
NONE = "none"  # a result that is None


class PreparedLaunch:
    """One launch: ``args = (tensors from registers, *pre, M, *post)``, its grid ``grid_of(grid(meta), M)``.

    After its first launch on Triton's path it holds ``fast``: the grid's form for the config Triton chose, the
    compiled kernel's launch (``_direct.direct_launch``, else the compiled kernel's own ``run``) and the arguments
    after ``args`` (the config's and the defaults)."""

    __slots__ = ("launcher", "name", "slots", "gather", "pre", "post", "kwargs", "grid", "allocator", "counters",
                 "fast")

    def __init__(self, launcher, slots, pre, post, kwargs, grid, allocator=False, counters=None):
        self.launcher, self.name, self.slots = launcher, launcher.name, tuple(slots)
        self.gather = operator.itemgetter(*slots)
        self.pre, self.post, self.kwargs, self.grid = tuple(pre), tuple(post), kwargs, grid
        self.allocator = allocator  # TMA descriptors need triton's allocator in this thread
        self.counters = counters  # the register of the arrival counters it uses, if any
        self.fast = None

    def __call__(self, rows, regs, stream):
        fast = self.fast
        if fast is None or stream is None:
            self.through_triton(rows, regs)
            return
        _COUNTS[self.name] += 1
        block, mult, cap, g1, launch, before, middle, after, packed, per_program, align = fast
        g0 = min(-(-rows // block) * mult, cap) if block else cap
        args = (*self.gather(regs), *self.pre, rows, *after)
        if packed is None:  # the compiled kernel's own launcher (``before``: its function and metadata, no hooks)
            if self.allocator:
                ensure_scratch_allocator()
            launch(g0, g1, 1, stream, *before, *args)
            return
        scratch = None
        if per_program:  # as Triton's launcher asks its allocator for the kernel's global scratch
            allocator = _ALLOCATOR.get()
            if self.allocator and type(allocator) is _NullAllocator:
                ensure_scratch_allocator()
                allocator = _ALLOCATOR.get()
            scratch = allocator(g0 * g1 * per_program, align, stream)
        if packed:
            launch(g0, g1, 1, stream, *before, scratch, None, *middle, args)
        else:
            launch(g0, g1, 1, stream, *before, scratch, None, *middle, *args)

    def scratch(self, g0: int, g1: int, stream) -> object:
        """The global scratch a compiled launch of ``g0 x g1`` programs needs, from Triton's allocator (as
        ``__call__``)."""
        per_program, align = self.fast[9], self.fast[10]
        allocator = _ALLOCATOR.get()
        if self.allocator and type(allocator) is _NullAllocator:
            ensure_scratch_allocator()
            allocator = _ALLOCATOR.get()
        return allocator(g0 * g1 * per_program, align, stream)

    def emit(self, name: str, space: dict) -> list[str] | None:
        """``__call__`` on a compiled launch as source (``compile_steps``); None before the first launch."""
        if self.fast is None:
            return None
        block, mult, cap, g1, launch, before, middle, after, packed, per_program, _ = self.fast
        space[f"{name}_launch"] = launch
        before, middle = _replay.spelled(before, f"{name}_b", space), _replay.spelled(middle, f"{name}_m", space)
        args = ", ".join([*(f"regs[{i}]" for i in self.slots), *_replay.spelled(self.pre, f"{name}_p", space), "rows",
                          *_replay.spelled(after, f"{name}_a", space)])
        lines = [f"_COUNTS[{self.name!r}] += 1",
                 f"g0 = min(-(-rows // {block}) * {mult}, {cap})" if block else f"g0 = {cap}"]
        if packed is None:
            if self.allocator:
                lines.append("ensure_scratch_allocator()")
            return [*lines, f"{name}_launch(g0, {g1}, 1, stream, {', '.join([*before, args])})"]
        scratch = f"{name}.scratch(g0, {g1}, stream)" if per_program else "None"
        head = ", ".join([*before, scratch, "None", *middle])
        return [*lines, f"{name}_launch(g0, {g1}, 1, stream, {head}, " + (f"({args},))" if packed else f"{args})")]

    def through_triton(self, rows, regs) -> None:
        """The launch through ``CachedLauncher`` (Triton binds, compiles, autotunes); the first one that leaves a
        compiled kernel in its cache sets ``fast``."""
        args = (*self.gather(regs), *self.pre, rows, *self.post)
        grid = self.grid
        if self.allocator:
            ensure_scratch_allocator()
        with _reduce.reset_on_failure(None if self.counters is None else regs[self.counters]):
            self.launcher(lambda meta: grid_of(grid(meta), rows), *args, **self.kwargs)
        if self.fast is None:
            entry = self.launcher.entry(args, self.kwargs)
            if entry is not None:
                self.take(entry)

    def take(self, entry: tuple) -> None:
        """Launch later calls with ``entry`` (``CachedLauncher.entry``: run, function, packed metadata, the
        arguments after ``args``, them by name)."""
        run, function, packed_metadata, tail, meta = entry
        form = self.grid(meta)
        direct = direct_launch(run, function, packed_metadata)
        after = (*self.post, *tail)  # the arguments after M
        if direct is None:
            self.fast = (*form, run, (function, packed_metadata, None, None), (), after, None, 0, 0)
        else:
            self.fast = (*form, direct.launch, direct.before, direct.after, after, direct.packed,
                         direct.per_program, direct.align)
        _TAKEN[0] += 1


_ALLOCATOR = _allocation._allocator  # Triton's allocator (a ContextVar), as its launcher reads it
_NullAllocator = _allocation.NullAllocator


class Alloc:
    """``regs[index] = torch.empty(shape, dtype, device)``, ``ROWS`` in ``shape`` standing for M; replayed as
    ``template.new_empty(*shape)`` from an empty tensor of that dtype and device that the step keeps (the same new
    tensor; Python's argument parser takes sizes as ints and no keywords a third faster than ``torch.empty``'s)."""

    __slots__ = ("index", "shape", "at", "before", "after", "template")

    def __init__(self, index, shape, dtype, device):
        if not shape:
            raise ValueError("a recorded allocation has at least one dim")  # replayed as new_empty(*shape)
        self.index, self.shape = index, tuple(shape)
        self.at = shape.index(ROWS) if ROWS in shape else -1
        self.before, self.after = (self.shape[:self.at], self.shape[self.at + 1:]) if self.at >= 0 else ((), ())
        self.template = torch.empty(0, dtype=dtype, device=device)

    def __call__(self, rows, regs, stream):
        if self.at < 0:
            regs[self.index] = self.template.new_empty(*self.shape)
        else:
            regs[self.index] = self.template.new_empty(*self.before, rows, *self.after)

    def emit(self, name: str, space: dict) -> list[str]:
        space[name] = self.template
        sizes = self.shape if self.at < 0 else (*self.before, ROWS, *self.after)
        return [f"regs[{self.index}] = {name}.new_empty({', '.join(str(n) for n in sizes)})"]


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

    def emit(self, name: str, space: dict) -> list[str]:
        return [f"b = _WORKSPACES.get(({self.device_index!r}, stream))",
                f"if b is None or b.numel() < {self.elements} or torch.cuda.is_current_stream_capturing():",
                f"    {name}(rows, regs, stream)",
                "else:",
                f"    regs[{self.index}] = b"]


_WORKSPACES: dict[tuple, torch.Tensor] = {}


class Counters:
    """``regs[index]`` = ``count`` zeroed arrival counters (``_reduce.arrival_counters``): on a compiled launch its
    cached buffer of the (device, stream), looked up with the stream the steps launch on; else, or where that
    buffer is missing, too small or a CUDA graph is being captured, ``arrival_counters`` itself."""

    __slots__ = ("index", "device", "count", "device_type", "device_index")

    def __init__(self, index, device, count):
        self.index, self.device, self.count = index, device, count
        self.device_type, self.device_index = device.type, device.index if device.index is not None else 0

    def __call__(self, rows, regs, stream):
        if stream is not None:
            buffer = _reduce._COUNTERS.get((self.device_type, self.device_index, stream))
            if buffer is not None and buffer.numel() >= self.count and not torch.cuda.is_current_stream_capturing():
                regs[self.index] = buffer
                return
        regs[self.index] = _reduce.arrival_counters(self.device, self.count)

    def emit(self, name: str, space: dict) -> list[str]:
        return [f"b = _reduce._COUNTERS.get(({self.device_type!r}, {self.device_index}, stream))",
                f"if b is None or b.numel() < {self.count} or torch.cuda.is_current_stream_capturing():",
                f"    {name}(rows, regs, stream)",
                "else:",
                f"    regs[{self.index}] = b"]


class Call:
    """``regs[index] = fn(*registers and constants)``: a torch op between launches."""

    __slots__ = ("index", "fn", "args")

    def __init__(self, index, fn, args):
        self.index, self.fn, self.args = index, fn, args  # args: (is_register, register or constant) pairs

    def __call__(self, rows, regs, stream):
        regs[self.index] = self.fn(*[regs[v] if is_reg else v for is_reg, v in self.args])

    def emit(self, name: str, space: dict) -> list[str]:
        return [f"{name}(rows, regs, stream)"]


class RowsKey(NamedTuple):
    """A family's key as a function of the row count M, arithmetic alone: ``max(1, min((M + add) // div, cap))``."""

    add: int
    div: int
    cap: int

    def __call__(self, rows: int) -> int:
        return max(1, min((rows + self.add) // self.div, self.cap))


class Family:
    """Steps that depend on the exact row count through ``key(M)`` (a ``RowsKey``): one list per key, recorded (and
    run) by ``make(key, rows, regs)`` on the call that first meets the key; ``functions`` holds the members that
    compiled (``Compiled``)."""

    __slots__ = ("key", "make", "members", "functions")

    def __init__(self, key: RowsKey, make):
        self.key, self.make, self.members = RowsKey(*key), make, {}
        self.functions: dict[int, Callable] = {}

    def __call__(self, rows, regs, stream):
        add, div, cap = self.key
        k = max(1, min((rows + add) // div, cap))
        member = self.members.get(k)
        if member is None:
            self.members[k] = Compiled(self.make(k, rows, regs))
            return
        member(rows, regs, stream)
        if member.function is not None:
            self.functions[k] = member.function

    def emit(self, name: str, space: dict) -> list[str]:
        add, div, cap = self.key
        space[f"{name}_functions"] = self.functions
        return [f"member = {name}_functions.get(max(1, min((rows + {add}) // {div}, {cap})))",
                "if member is None:",
                f"    {name}(rows, regs, stream)",
                "else:",
                "    member(rows, regs, stream)"]


class Steps:
    """A recorded forward or backward: ``steps(*inputs)`` returns the result registers for new inputs of the
    recorded signature (the first input's leading dim is M)."""

    __slots__ = ("steps", "blank", "results", "device", "index", "gpu", "run")

    def __init__(self, steps, n_inputs, n_regs, results, device):
        # Registers past the inputs, and one more that stays None (the ``NONE`` results).
        self.steps, self.blank = steps, [None] * (n_regs - n_inputs + 1)
        self.run = Compiled(steps)
        self.results = operator.itemgetter(*results) if len(results) > 1 else lambda regs: (regs[results[0]],)
        self.gpu, self.device = _common.is_gpu(device), device
        self.index = device.index if device.index is not None else 0

    def __call__(self, *inputs):
        rows = inputs[0].shape[0]
        regs = [*inputs, *self.blank]
        # The stream to launch on, or None where the launches must take Triton's own path: a launch hook is set
        # (a profiler wants to see the launch) or the current device is not the tensors'.
        stream = None
        if self.gpu:
            enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
            if ((enter is None or (type(enter) is _HookChain and not enter.calls))
                    and (leave is None or (type(leave) is _HookChain and not leave.calls))):
                active = _driver.active
                if active.get_current_device() == self.index:
                    stream = active.get_current_stream(self.index)
        run = self.run
        if run.function is not None and stream is not None:
            run.function(rows, regs, stream)
        elif stream is None and self.gpu:  # Triton launches on the current device: make it the tensors'
            with _common.launch_device(self.device):
                run(rows, regs, stream)
        else:
            run(rows, regs, stream)
        return self.results(regs)


def _run(steps: list, rows: int, regs: list, stream) -> None:
    """Run ``steps``; allocations inline (a call's most frequent step: no frame of its own)."""
    for step in steps:
        if type(step) is Alloc:
            if step.at < 0:
                regs[step.index] = step.template.new_empty(*step.shape)
            else:
                regs[step.index] = step.template.new_empty(*step.before, rows, *step.after)
        else:
            step(rows, regs, stream)


class Compiled:
    """``compiled(rows, regs, stream)`` runs a step list: on a compiled launch (``stream`` not None) as one generated
    function once every launch in it has its compiled kernel (``compile_steps``), else step by step (``_run``).
    Tried again only after a launch took its kernel (``PreparedLaunch.take``) since the last try."""

    __slots__ = ("steps", "function", "tried")

    def __init__(self, steps: list):
        self.steps, self.function, self.tried = steps, None, -1

    def __call__(self, rows, regs, stream):
        function = self.function
        if function is None and stream is not None and self.tried != _TAKEN[0]:
            self.tried = _TAKEN[0]
            function = self.function = compile_steps(self.steps)
        if function is None or stream is None:
            _run(self.steps, rows, regs, stream)
        else:
            function(rows, regs, stream)


_TAKEN = [0]  # launches that took their compiled kernel so far (a later compile may succeed)


def compile_steps(steps: list) -> Callable | None:
    """``_replay.compile_steps`` with the names the steps' sources use."""
    return _replay.compile_steps(steps, {"_COUNTS": _COUNTS, "_WORKSPACES": _WORKSPACES, "_reduce": _reduce,
                                         "torch": torch, "ensure_scratch_allocator": ensure_scratch_allocator})


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
        with _common.launch_device(self.device):  # Triton launches on the current device: the tensors'
            step(self.rows, self.regs, None)

    def empty(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        self.run(Alloc(self._new(name), shape, dtype, self.device))
        return self[name]

    def workspace(self, name: str, shape: tuple) -> torch.Tensor:
        """fp32 scratch a launch writes before it reads (``Workspace``)."""
        self.run(Workspace(self._new(name), shape, self.device))
        return self[name]

    def counters(self, name: str, count: int) -> torch.Tensor:
        """``count`` zeroed arrival counters (``Counters``)."""
        self.run(Counters(self._new(name), self.device, count))
        return self[name]

    def call(self, name: str, fn, *args) -> torch.Tensor:
        """``name = fn(*args)``, each arg a register's name (str) or a constant."""
        pairs = tuple((True, self.index(a)) if isinstance(a, str) else (False, a) for a in args)
        self.run(Call(self._new(name), fn, pairs))
        return self[name]

    def family(self, key: RowsKey, make) -> None:
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


# A grid's form for one config: ``(block, mult, cap, g1)``, the grid ``(min(cdiv(M, block) * mult, cap), g1)`` for
# the call's row count M, or ``(cap, g1)`` for every M where ``block`` is 0: a launch computes it with arithmetic
# alone (``_plan_launches.py`` gives each kernel's).
def grid_of(form: tuple[int, int, int, int], rows: int) -> tuple[int, int]:
    block, mult, cap, g1 = form
    return (min(-(-rows // block) * mult, cap) if block else cap), g1
