"""The steps of a launch plan (``_plan.py``): what each does when a plan replays it (``__call__(rows, regs,
stream)``: the call's row count M, its register list, the stream to launch on or None for Triton's own path) and
how it is written out (``emit``, for ``_replay.py``).

- ``Alloc``: a new tensor, its shape with ``ROWS`` for M;
- ``PreparedLaunch``: a kernel launch with every argument but the tensors and M fixed, its grid a form of M;
- ``Workspace``, ``Counters``: cached scratch per device and stream (fresh under CUDA-graph capture);
- ``Call``: a torch op between launches;
- ``Family``: steps chosen by a ``RowsKey`` of M, one member list per key value (``Compiled``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from triton.runtime import _allocation

from . import _common, _reduce, _replay
from ._direct import direct_launch
from ._launch import _LAUNCHES as _COUNTS
from ._launch import _HookChain
from ._tma import ensure_scratch_allocator

ROWS = "rows"  # in a recorded shape: the call's row count


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
        _COUNTS[self.name] = _COUNTS.get(self.name, 0) + 1
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

    def emit(self, name: str, src: _replay.Source) -> list[str] | None:
        """``__call__`` on a compiled launch as source (``_replay``); None before the first launch."""
        if self.fast is None:
            return None
        block, mult, cap, g1, launch, before, middle, after, packed, per_program, _ = self.fast
        src.space[f"{name}_launch"] = launch
        before, middle = src.spelled(before, f"{name}_b"), src.spelled(middle, f"{name}_m")
        varying = ", ".join([*(src.reg(i) for i in self.slots), *src.spelled(self.pre, f"{name}_p"), "rows"])
        if packed:  # one tuple: what varies, then the fixed arguments as one constant (a display of over 30
            # items would be built item by item through a list, at twice the cost)
            src.space[f"{name}_after"] = tuple(after)
            args = f"({varying},) + {name}_after"
        else:
            args = ", ".join([varying, *src.spelled(after, f"{name}_a")])
        lines = [f"_COUNTS[{self.name!r}] = _COUNTS.get({self.name!r}, 0) + 1", *_grid_lines(block, mult, cap)]
        if packed is None:
            if self.allocator:
                lines.append("ensure_scratch_allocator()")
            return [*lines, f"{name}_launch(g0, {g1}, 1, stream, {', '.join([*before, args])})"]
        scratch = f"{name}.scratch(g0, {g1}, stream)" if per_program else "None"
        head = ", ".join([*before, scratch, "None", *middle])
        return [*lines, f"{name}_launch(g0, {g1}, 1, stream, {head}, {args})"]

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

    def emit(self, name: str, src: _replay.Source) -> list[str]:
        sizes = self.shape if self.at < 0 else (*self.before, ROWS, *self.after)
        src.space[f"{name}_t"] = self.template
        return [f"{src.reg(self.index)} = {name}_t.new_empty({', '.join(str(n) for n in sizes)})"]


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

    def emit(self, name: str, src: _replay.Source) -> list[str]:
        return [*src.capturing(), f"b = _WORKSPACES.get(({self.device_index!r}, stream))",
                f"if b is None or b.numel() < {self.elements} or capturing:",
                *_replay.indented(src.run_step(name, (self.index,))),
                "else:",
                f"    {src.reg(self.index)} = b"]


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

    def emit(self, name: str, src: _replay.Source) -> list[str]:
        return [*src.capturing(), f"b = _reduce._COUNTERS.get(({self.device_type!r}, {self.device_index}, stream))",
                f"if b is None or b.numel() < {self.count} or capturing:",
                *_replay.indented(src.run_step(name, (self.index,))),
                "else:",
                f"    {src.reg(self.index)} = b"]


class Call:
    """``regs[index] = fn(*registers and constants)``: a torch op between launches."""

    __slots__ = ("index", "fn", "args")

    def __init__(self, index, fn, args):
        self.index, self.fn, self.args = index, fn, args  # args: (is_register, register or constant) pairs

    def __call__(self, rows, regs, stream):
        regs[self.index] = self.fn(*[regs[v] if is_reg else v for is_reg, v in self.args])

    def emit(self, name: str, src: _replay.Source) -> list[str]:
        return src.run_step(name, (self.index,))


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

    def written(self) -> tuple[int, ...]:
        return _replay.written([step for member in self.members.values() for step in member.steps])

    def emit(self, name: str, src: _replay.Source) -> list[str]:
        add, div, cap = self.key
        if not src.local:
            src.space[f"{name}_functions"] = self.functions
            return [f"member = {name}_functions.get(max(1, min((rows + {add}) // {div}, {cap})))",
                    "if member is None:",
                    f"    {name}(rows, regs, stream)",
                    "else:",
                    "    member(rows, regs, stream)"]
        # The members that compile, written in (the first few met); the others through the family.
        branches, inlined = [], 0
        for k, member in self.members.items():
            body = src.body(member.steps, f"{name}_{k}_") if inlined < _replay.INLINE_MEMBERS else None
            if body is not None:
                branches += [f"{'elif' if inlined else 'if'} k == {k}:", *_replay.indented(body)]
                inlined += 1
        other = src.run_step(name, self.written(), grows=True)
        if inlined < _replay.INLINE_MEMBERS:  # room for more: write them in once they compile
            other.append(f"if _TAKEN[0] != {_TAKEN[0]}: _stale()")
        if not branches:
            return other
        # max(1, min(..., cap)) written as comparisons: no builtin calls
        return [f"k = (rows + {add}) // {div}", f"if k > {cap}:", f"    k = {cap}", "if k < 1:", "    k = 1",
                *branches, "else:", *_replay.indented(other)]


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
    return _replay.compile_steps(steps, names())


def names(**more) -> dict:
    """The names the generated sources use (and ``more``)."""
    return {"_COUNTS": _COUNTS, "_WORKSPACES": _WORKSPACES, "_reduce": _reduce, "torch": torch, "_TAKEN": _TAKEN,
            "ensure_scratch_allocator": ensure_scratch_allocator, "_HookChain": _HookChain,
            "_capturing": _common.capture_check(), **more}


# A grid's form for one config: ``(block, mult, cap, g1)``, the grid ``(min(cdiv(M, block) * mult, cap), g1)`` for
# the call's row count M, or ``(cap, g1)`` for every M where ``block`` is 0: a launch computes it with arithmetic
# alone (``_plan_launches.py`` gives each kernel's).
def grid_of(form: tuple[int, int, int, int], rows: int) -> tuple[int, int]:
    block, mult, cap, g1 = form
    return (min(-(-rows // block) * mult, cap) if block else cap), g1


def _grid_lines(block: int, mult: int, cap: int) -> list[str]:
    """``g0`` of ``grid_of`` as source: ``min(cdiv(M, block) * mult, cap)`` written as a comparison (no builtin
    calls, no multiplication by 1)."""
    if not block:
        return [f"g0 = {cap}"]
    return [f"g0 = -(-rows // {block})" + (f" * {mult}" if mult != 1 else ""), f"if g0 > {cap}:", f"    g0 = {cap}"]
