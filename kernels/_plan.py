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

The step types are in ``_steps.py``. Once every launch of a list has its compiled kernel, the whole call runs as
one generated function, ``Steps.function`` (``_replay.py``: each step's ``emit`` writes out what its ``__call__``
does; the registers are its locals, the choice of the stream is its head, a family's members are its branches).
Triton's own path is taken, step by step and inside the tensors' device, for a launch with no compiled kernel
(Triton's interpreter, a launch the cache refused), and where a compiled launch would not do what Triton does: a
launch hook is set (a profiler wants to see the launch), the current device is not the tensors'. Triton's
compilation knobs (``runtime.debug``, ``compilation.instrumentation_mode``, ...) are those of the recording: they
change how a kernel is checked or instrumented, not what it computes; after changing one at run time,
``fused_residual.plans.clear()`` makes the next calls record again. Launches are counted like ``CachedLauncher``'s
(``_launch.launch_counts``).

The kernels' launches are recorded by ``_plan_launches.py``, which lays out their arguments as their wrappers do,
with their grids' forms and row-count keys.
"""

from __future__ import annotations

import sys
import weakref

import torch
from triton import knobs as _knobs
from triton.runtime.driver import driver as _driver

from . import _common, _replay
from ._launch import _HookChain
from ._steps import (
    _TAKEN,
    ROWS,
    Alloc,
    Call,
    Compiled,
    Counters,
    Family,
    PreparedLaunch,
    RowsKey,
    Workspace,
    _run,
    compile_steps,
    grid_of,
    names,
)

__all__ = ["NONE", "ROWS", "Alloc", "Call", "Compiled", "Counters", "Family", "PreparedLaunch", "Recorder",
           "RowsKey", "Steps", "Workspace", "compile_steps", "grid_of"]

NONE = "none"  # a result that is None


class Steps:
    """A recorded forward or backward: ``steps(*inputs)`` returns the result registers for new inputs of the
    recorded signature (the first input's leading dim is M). Once its launches have their compiled kernels,
    ``function`` is the whole call as one generated function (``_replay.compile_function``; the callers that count
    microseconds call it themselves where it is not None)."""

    __slots__ = ("steps", "n_inputs", "names", "results", "device", "index", "gpu", "function", "tried",
                 "__weakref__")

    def __init__(self, steps: list, n_inputs: int, names: list, results: tuple[int | None, ...], device):
        # ``names``: the registers' names, shared with the recording's families (a member met later may add one);
        # ``results``: the registers returned, None for a None result.
        self.steps, self.n_inputs, self.names, self.results = steps, n_inputs, names, tuple(results)
        self.gpu, self.device = _common.is_gpu(device), device
        self.index = device.index if device.index is not None else 0
        self.function, self.tried = None, -1

    def __call__(self, *inputs):
        function = self.function
        if function is not None:
            return function(*inputs)
        return self.slow(*inputs)

    def slow(self, *inputs):
        """The call step by step (``_run``), writing the steps out (``function``) where they may be."""
        rows = inputs[0].shape[0]
        regs = [*inputs, *[None] * (len(self.names) - self.n_inputs)]
        # The stream to launch on, or None where the launches must take Triton's own path: a launch hook is set
        # (a profiler wants to see the launch) or the current device is not the tensors'. (The generated
        # function's head says the same: _HEAD.)
        stream = None
        if self.gpu:
            enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
            if ((enter is None or (type(enter) is _HookChain and not enter.calls))
                    and (leave is None or (type(leave) is _HookChain and not leave.calls))):
                active = _driver.active
                if active.get_current_device() == self.index:
                    stream = active.get_current_stream(self.index)
        if stream is not None:
            if self.tried != _TAKEN[0]:
                self.tried = _TAKEN[0]
                self.function = self.compile()
                if self.function is not None:
                    return self.function(*inputs)
            _run(self.steps, rows, regs, stream)
        elif self.gpu:  # Triton launches on the current device: make it the tensors'
            with _common.launch_device(self.device):
                _run(self.steps, rows, regs, None)
        else:
            _run(self.steps, rows, regs, None)
        return self.take(regs)

    def take(self, regs: list) -> tuple:
        """The results from a call's registers."""
        return tuple(None if r is None else regs[r] for r in self.results)

    def compile(self, source: bool = False):
        """The generated function of the whole call (or its source); None while a launch has no compiled kernel."""
        ref = weakref.ref(self)  # the function's names must not keep its Steps alive

        def stale() -> None:  # a family met a member it has not written in: write the steps out again
            steps = ref()
            if steps is not None:
                steps.function = None

        inputs = ", ".join(f"r{i}" for i in range(self.n_inputs))
        drivers, runtime = _driver, _knobs.runtime  # (runtime: never replaced; Triton sets and scopes its attributes)
        space = names(_plan=sys.modules[__name__], _steps=ref, _stale=stale, _names=self.names, _runtime=runtime)
        active, enter, leave = drivers.active, runtime.launch_enter_hook, runtime.launch_exit_hook
        if (getattr(drivers, "_active", None) is active and type(enter) is _HookChain and type(leave) is _HookChain
                and not (enter.calls or leave.calls)):
            # Triton's DriverConfig and hook chains: the active driver read without its property, the hook chains
            # checked by identity; the driver's own device and stream getters, bound (the C ones where provably the
            # same)
            space.update(_drivers=drivers, _active=active, _enter=enter, _leave=leave,
                         _stream=active.get_current_stream,
                         _device=_common.current_device_reader(active.get_current_device))
            lines = _HEAD_BOUND
        else:
            lines = _HEAD
        head = [line.format(index=self.index, inputs=inputs) for line in lines]
        return _replay.compile_function(self.steps, space, self.n_inputs, len(self.names), self.results, head,
                                        source)


# The head of a Steps' generated function: ``Steps.slow``'s choice of the stream, written out.
_HEAD = ("rows = r0.shape[0]",
         "enter = _runtime.launch_enter_hook",
         "leave = _runtime.launch_exit_hook",
         "if not ((enter is None or (type(enter) is _HookChain and not enter.calls))",
         "        and (leave is None or (type(leave) is _HookChain and not leave.calls))):",
         "    return _steps().slow({inputs})",
         "active = _plan._driver.active",
         "if active.get_current_device() != {index}:",
         "    return _steps().slow({inputs})",
         "stream = active.get_current_stream({index})")
# The same with the hook chains, the active driver and its getters bound when the function was written, each
# checked by identity (a hook chain or driver set since: the call takes ``slow``, Triton's way).
_HEAD_BOUND = ("rows = r0.shape[0]",
               "if (_runtime.launch_enter_hook is not _enter or _enter.calls",
               "        or _runtime.launch_exit_hook is not _leave or _leave.calls",
               "        or _plan._driver is not _drivers or _drivers._active is not _active",
               "        or _device() != {index}):",
               "    return _steps().slow({inputs})",
               "stream = _stream({index})")


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
        call that first meets it. A name that two members use is one register."""
        names, device = self.names, self.device  # not self: its registers must not live on

        def member(k, rows, regs):
            sub = _Sub(names, regs, rows, device)
            make(k, sub)
            return sub.steps

        self.run(Family(key, member))

    def steps_for(self, results: tuple[str, ...]) -> Steps:
        """The recorded steps, returning the registers named by ``results`` (``NONE``: None)."""
        steps = Steps(self.steps, self.n_inputs, self.names, [None if r == NONE else self.index(r) for r in results],
                      self.device)
        self.regs = []  # this call's tensors belong to it alone
        return steps


class _Sub(Recorder):
    """Records a family member into its own list, over one call's registers."""

    def __init__(self, names: list, regs: list, rows: int, device: torch.device):  # noqa: D107
        self.names, self.regs, self.rows, self.device, self.steps = names, regs, rows, device, []

    def _new(self, name: str) -> int:
        if name in self.names:  # a later member: the register an earlier one named
            return self.names.index(name)
        # A register no member named before (a split-K member's workspace after one without): appended to the
        # names the steps share and to this call's registers (as long as the names, ``Source.run_step``).
        return Recorder._new(self, name)

