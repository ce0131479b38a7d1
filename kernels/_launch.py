"""A low-overhead launch path for the Triton kernels, and launch counters.

``CachedLauncher(kernel)(grid, *args, **kwargs)`` does what ``kernel[grid](*args, **kwargs)`` does. The first
launch at a given specialization goes through Triton (bind, specialize, compile, autotune); later ones call the
compiled kernel's launcher directly, as ``JITFunction.run`` would, without binding the arguments again.

What Triton does per launch (read from the sources of triton 3.6.0 and 3.9.0; the same in both unless noted):

- ``JITFunction.run(*args, grid, warmup, **kwargs)`` binds the arguments (a generated binder calls
  ``native_specialize_impl`` once per parameter), looks the kernel up in a per-device cache keyed on the
  specialization and the keyword options, compiles on a miss, then calls ``kernel.run(grid_0, grid_1, grid_2,
  stream, kernel.function, kernel.packed_metadata, launch_metadata, knobs.runtime.launch_enter_hook,
  knobs.runtime.launch_exit_hook, *bound_args.values())`` and returns the ``CompiledKernel``. ``bound_args`` is
  every parameter in signature order, constexprs included; missing grid dimensions are 1.
- The launcher behind ``CompiledKernel.run`` differs: 3.6's ``CudaLauncher.__call__(gridX, gridY, gridZ, stream,
  function, *args)`` hands everything to a generated C module that parses constexprs as ``O`` and leaves them out
  of the kernel parameters; 3.9's ``__call__(gridX, gridY, gridZ, stream, function, kernel_metadata,
  launch_metadata, launch_enter_hook, launch_exit_hook, *args)`` marks them ``ARG_CONSTEXPR`` for a native
  launcher. Both take all bound arguments, in the order above, and call a hook only when it is not None.
- ``device = driver.active.get_current_device()`` (``torch.cuda.current_device``: the current device, not the
  tensors'; kernels are compiled and loaded per device), ``stream = driver.active.get_current_stream(device)``
  (``torch._C._cuda_getCurrentRawStream``). The launch hooks default to empty ``HookChain`` objects, never None,
  so Triton builds ``kernel.launch_metadata(grid, stream, *bound_args)`` for every launch.
- A callable grid is called with the ``bound_args`` dict (every parameter by name, meta-parameters included).
- ``Autotuner.run`` keys its choice on the values of its ``key`` arguments plus ``str(dtype)`` of every argument
  that has one, sets ``self.best_config``, calls ``config.pre_hook`` if set, and returns ``self.fn.run(*args,
  **kwargs, **config.all_kwargs())``: the ``CompiledKernel`` of the chosen config.
- Specialization (``native_specialize_impl``, probed on both): a tensor is ``*<dtype>``, plus ``tt.divisibility
  16`` when ``data_ptr() % 16 == 0``; an int equal to 1 becomes the constexpr 1; other ints are ``i32`` in
  [-2^31, 2^31), ``i64`` below 2^63, ``u64`` below 2^64, plus divisibility 16 when ``% 16 == 0`` (0 and negative
  multiples included); ``do_not_specialize`` drops the 1 and the divisibility, ``do_not_specialize_on_alignment``
  the divisibility; bools are ``u1`` and floats ``fp32`` whatever their value; None is a constexpr; constexpr
  parameters are compiled in by value. The kernel cache also keys on the knobs ``JITFunction.run`` reads (3.6:
  ``runtime.debug``, ``compilation.instrumentation_mode``; 3.9 adds ``compilation.fpsan_homomorphic_casts`` and
  ``runtime.add_stages_inspection_hook``).

This cache keys each call on: the type of every positional argument; each tensor's dtype and pointer residue
mod 16 (0: aligned); each int's class (== 1, divisible by 16, i32/i64/u64); the value of every other positional
argument (constexprs, None, bools, floats); the keyword arguments; the values of the autotuner's key arguments;
those knobs; the current device. Values compare with ``==``, as in Triton's own cache (there, too, a constexpr
True and 1 share a kernel); types, residues and bool or float values are stricter than Triton, which costs at
most a miss. Before an entry is stored it is checked against the compiled kernel's own signature, constants and
divisibility attributes: a Triton that specializes on anything else is not cached rather than served stale.
A hit makes Triton's call with the same arguments, except that empty hook chains go to the launcher as None with
no launch metadata (the launchers skip None hooks: nothing observable changes), and that a callable grid gets
the bound-arguments dict filled lazily (``_BoundArgs``).

Triton's own path is always taken: under the interpreter (``TRITON_INTERPRET=1`` makes ``triton.jit`` return an
``InterpretedFunction``: no compiled kernel); for ``Heuristics`` and other wrappers; for kernels with pre-run
hooks or global values Triton re-checks per launch, configs with a ``pre_hook``, non-constexpr parameters
passed by keyword, a hook set in the knobs above; with ``FUSED_RESIDUAL_LAUNCH_CACHE=0`` or ``ENABLED = False``;
on a Triton whose ``JITFunction.run`` / ``Autotuner.run`` lack the exact statements reproduced here (checked
once on their source, a feature test rather than a version test: 3.6.0, 3.8.0 and 3.9.0 pass); and where the
active driver's launcher is not one a hit was checked against (``launcher_problem``: NVIDIA's only; HIP's, which
allocates scratch and takes its arguments its own way, not until a hit is checked on an AMD GPU).
Autotuning is decided once per key, as Triton's own cache does: clearing ``Autotuner.cache`` needs ``clear()``.

Threads: Triton's interpreter keeps the running program's ids and its patches of ``triton.language`` in
process-wide state, so two interpreted launches at once raise or compute wrong results. Interpreted launches
(a kernel decorated while ``TRITON_INTERPRET=1``) are therefore serialised by one process-wide lock; compiled
launches take no lock. Compiled launches may come from several threads: a cache entry is built whole before it is
stored with one dict assignment, and a miss (Triton's path, then ``_store``) holds the launcher's own lock, so the
autotuner's ``best_config`` read for an entry is the one chosen for that call, not another thread's.

Counting: every launch through a ``CachedLauncher`` adds 1 to ``launch_counts()[name]`` (name: the kernel
function's ``__name__``), on either path and under the interpreter; ``triton_path_counts()`` counts the ones
that went through Triton. Autotuning's benchmark launches are not counted.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import re
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from triton import knobs as _knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver as _driver
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, mangle_type

ENABLED: bool = os.environ.get("FUSED_RESIDUAL_LAUNCH_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")
# Entries per launcher and positional-type signature; the table is emptied when full (a new M bucket, dtype or
# flag set adds one entry, so only a pathological caller gets there).
MAX_ENTRIES = 1024

_LAUNCHES: dict[str, int] = {}  # a plain dict: a Counter's += costs 2.5 times a dict's get and set
_TRITON_PATH: Counter[str] = Counter()
_ALL_LAUNCHERS: weakref.WeakSet[CachedLauncher] = weakref.WeakSet()

# The statements of JITFunction.run / Autotuner.run that a hit reproduces, whitespace removed.
_RUN_STATEMENTS = (
    "device=driver.active.get_current_device()",
    "stream=driver.active.get_current_stream(device)",
    "bound_args,specialization,options=binder(*args,**kwargs)",
    "grid=grid(bound_args)",
    "grid_1=grid[1]ifgrid_size>1else1",
    "grid_2=grid[2]ifgrid_size>2else1",
    "launch_metadata=kernel.launch_metadata(grid,stream,*bound_args.values())",
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())",
)
_AUTOTUNER_STATEMENTS = ("self.best_config=config", "self.fn.run(*args,**kwargs,**config.all_kwargs())")
# The launchers a hit's call (``compiled.run``, None for empty hook chains) was checked against, and the statement
# of their ``__call__`` it relies on.
_CHECKED_LAUNCHERS = ("triton.backends.nvidia.driver.CudaLauncher",)
_LAUNCHER_STATEMENTS = ("self.launch(gridX,gridY,gridZ,stream,function",)
_HOOKS = {"runtime.launch_enter_hook", "runtime.launch_exit_hook"}
_HookChain = getattr(_knobs, "HookChain", None)


def _squeezed(source: str) -> str:
    return re.sub(r",\)", ")", re.sub(r"\s+", "", source))


@functools.cache
def _run_source() -> str:
    return inspect.getsource(JITFunction.run)


@functools.cache
def support_problem() -> str | None:
    """Why this Triton's kernels always launch through Triton's own path, or None where the cache applies."""
    try:
        return launch_path_problem(_run_source(), inspect.getsource(Autotuner.run))
    except (OSError, TypeError) as e:
        return f"cannot read Triton's source ({e})"


def launch_path_problem(run_source: str, autotuner_run_source: str) -> str | None:
    """None if ``JITFunction.run`` / ``Autotuner.run`` (their source) make the calls a cache hit reproduces."""
    run_source, autotuner_run_source = _squeezed(run_source), _squeezed(autotuner_run_source)
    missing = [s for s in _RUN_STATEMENTS if s not in run_source]
    missing += [s for s in _AUTOTUNER_STATEMENTS if s not in autotuner_run_source]
    if missing:
        return f"this Triton's launch path is not the one reproduced here (no `{missing[0]}`)"
    if _HookChain is None:
        return "this Triton has no knobs.HookChain"
    return None


def launcher_problem() -> str | None:
    """Why compiled kernels of the active Triton backend always launch through Triton's own path (its launcher was
    not checked against what a cache hit does), or None where the cache applies."""
    try:
        cls = _driver.active.launcher_cls
    except Exception as e:  # no active driver: nothing compiled launches
        return f"no active Triton driver ({type(e).__name__}: {e})"
    return _launcher_class_problem(cls)


@functools.cache
def _launcher_class_problem(cls: type) -> str | None:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name not in _CHECKED_LAUNCHERS:
        return f"the active backend's launcher {name} is not one the launch cache was checked against"
    try:
        source = _squeezed(inspect.getsource(cls.__call__))
    except (OSError, TypeError) as e:
        return f"cannot read the launcher's source ({e})"
    missing = [s for s in _LAUNCHER_STATEMENTS if s not in source]
    return f"the launcher {name} is not the one checked (no `{missing[0]}`)" if missing else None


@functools.cache
def _knob_reader() -> Callable[[Any], Any]:
    """The knobs JITFunction.run reads (they are part of its kernel cache key), as one C-level getter."""
    names = sorted(set(re.findall(r"knobs\.(\w+\.\w+)", _run_source())) - _HOOKS)
    return operator.attrgetter(*names) if names else (lambda _: ())


class _IntClasses(dict):
    """int -> what Triton specializes an int argument on, memoized by value (``types`` keeps bools out)."""

    def __missing__(self, value: int) -> int:
        cls = _int_range(value) * 3 + (1 if value == 1 else 2 if value % 16 == 0 else 0)
        if len(self) < 65536:
            self[value] = cls
        return cls


def _int_range(value: int) -> int:
    """0: i32, 1: i64, 2: u64, 3: none (Triton raises)."""
    if -(2**31) <= value < 2**31:
        return 0
    if -(2**63) <= value < 2**63:
        return 1
    return 2 if 0 <= value < 2**64 else 3


_INT_CLASS = _IntClasses().__getitem__
_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr
_LOW_BITS = (15).__and__
_DIVISIBLE_16 = [("tt.divisibility", 16)]


def _getter(positions: list[int]) -> Callable[[tuple], tuple]:
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


class _Plan:
    """Where the tensors, ints and by-value arguments sit for one tuple of positional argument types."""

    __slots__ = ("tensors", "ints", "values", "entries")

    def __init__(self, tensors: list[int], ints: list[int], values: list[int]):
        self.tensors, self.ints, self.values = _getter(tensors), _getter(ints), _getter(values)
        self.entries: dict[tuple, tuple] = {}


class _BoundArgs(dict):
    """The dict of all bound arguments by name that Triton passes a callable grid, filled lazily: it starts with
    the parameters after the positional ones (the meta-parameters grids read) and gets the positional ones, in
    signature order, on the first access that needs them. Building all ~40 entries for every launch would cost
    a fifth of a cache hit. (A grid that mutates the dict changes what Triton launches, but not what this does.)"""

    __slots__ = ("_names", "_args")

    def __missing__(self, name: str) -> Any:
        if self._args is None:
            raise KeyError(name)
        self._fill()
        return self[name]

    def _fill(self) -> None:
        args = self._args
        if args is not None:
            self._args = None
            tail = dict.copy(self)
            dict.clear(self)
            dict.update(self, zip(self._names, args, strict=False))  # names run on past the positional ones
            dict.update(self, tail)


def _filled_first(name: str) -> Callable:
    method = getattr(dict, name)

    def filled(self, *args, **kwargs):
        self._fill()
        return method(self, *args, **kwargs)

    filled.__name__ = name
    return filled


for _name in ("__contains__", "__iter__", "__len__", "__reversed__", "__eq__", "__ne__", "__repr__", "__or__",
              "__ror__", "__ior__", "__setitem__", "__delitem__", "keys", "values", "items", "get", "copy", "pop",
              "popitem", "setdefault", "update", "clear"):
    setattr(_BoundArgs, _name, _filled_first(_name))


_INTERPRETER_LOCK = threading.RLock()  # one interpreted launch at a time, process-wide (module docstring)


def _interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (or the function an autotuner or heuristics wraps) runs in Triton's interpreter."""
    fn = kernel
    while fn is not None and not inspect.isfunction(fn):
        if isinstance(fn, InterpretedFunction):
            return True
        fn = getattr(fn, "fn", None)
    return False


def _base_function(kernel: Any) -> Any:
    fn = kernel
    while not inspect.isfunction(fn) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


class CachedLauncher:
    """``launcher(grid, *args, **kwargs)`` = ``kernel[grid](*args, **kwargs)`` (returns what Triton returns: the
    ``CompiledKernel``, None under the interpreter), through the cache where it applies (module docstring)."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.name: str = getattr(_base_function(kernel), "__name__", type(kernel).__name__)
        self.last_refusal: str | None = None  # why the latest Triton-path launch was not cached (for tests)
        self._tuner = kernel if getattr(type(kernel), "run", None) is Autotuner.run else None
        jit = kernel.fn if self._tuner is not None else kernel
        self._jit = jit if getattr(type(jit), "run", None) is JITFunction.run else None
        self._plans: dict[tuple[type, ...], _Plan] | None = None
        self._interpreted = _interpreted(kernel)
        self._miss_lock = threading.Lock()
        if self._jit is not None and support_problem() is None:
            self._plans = {}
            params = self._jit.params
            self._names = tuple(p.name for p in params)
            self._constexpr = tuple(p.is_constexpr for p in params)
            tuned = set(self._tuner.keys) if self._tuner is not None else set()
            self._tuned_positions = [i for i, name in enumerate(self._names) if name in tuned]
            self._knobs = _knob_reader()
        _ALL_LAUNCHERS.add(self)

    def __call__(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        _LAUNCHES[self.name] = _LAUNCHES.get(self.name, 0) + 1
        if self._plans is not None and ENABLED:
            try:
                plan = self._plans[tuple(map(type, args))]
                key = self._key(plan, args, kwargs)
                run, function, packed_metadata, tail, meta, compiled = plan.entries[key]
            except Exception:  # a miss, or an argument the key cannot hold: Triton's path decides
                pass
            else:
                bound = args + tail
                if callable(grid):
                    meta = _BoundArgs(meta)
                    meta._names, meta._args = self._names, args
                    grid = grid(meta)
                stream = _driver.active.get_current_stream(key[-1])
                enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
                if (enter is None or (type(enter) is _HookChain and not enter.calls)) and (
                        leave is None or (type(leave) is _HookChain and not leave.calls)):
                    metadata = enter = leave = None
                else:
                    metadata = compiled.launch_metadata(grid, stream, *bound)
                n = len(grid)
                run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, packed_metadata,
                    metadata, enter, leave, *bound)
                return compiled
        return self._triton_path(grid, args, kwargs)

    def _key(self, plan: _Plan, args: tuple, kwargs: dict) -> tuple:
        # One flat tuple (cheaper to build and hash than nested ones); unambiguous within a plan, whose tensor,
        # int and value counts are fixed. Alignment is the pointer's residue mod 16 (0: aligned), stricter than
        # Triton. Keywords compare by equality, as Triton's own cache does (True == 1 there too).
        tensors = plan.tensors(args)
        return (*map(_DTYPE, tensors), *map(_LOW_BITS, map(_DATA_PTR, tensors)), *map(_INT_CLASS, plan.ints(args)),
                *plan.values(args), self._knobs(_knobs), *kwargs, *kwargs.values(),
                _driver.active.get_current_device())  # last: the hit path reads it back

    def _triton_path(self, grid: Any, args: tuple, kwargs: dict) -> Any:
        _TRITON_PATH[self.name] += 1
        if self._interpreted:
            with _INTERPRETER_LOCK:
                return self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if self._plans is None or not ENABLED:
            return self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
        with self._miss_lock:
            compiled = self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
            try:
                self.last_refusal = self._store(args, kwargs, compiled)
            except Exception as e:  # never fail a launch that Triton made; say why it was not cached
                self.last_refusal = f"{type(e).__name__}: {e}"
        return compiled

    def _store(self, args: tuple, kwargs: dict, compiled: Any) -> str | None:
        """Cache ``compiled`` for calls keyed like this one; returns why not, or None."""
        problem = launcher_problem()
        if problem is not None:
            return problem
        jit = self._jit
        if jit.pre_run_hooks:
            return "the kernel has pre-run hooks"
        if jit.used_global_vals:
            return "the kernel reads global values that Triton re-checks at every launch"
        src = getattr(compiled, "src", None)
        if src is None or getattr(compiled, "function", None) is None:
            return "Triton returned no loaded compiled kernel"
        config: dict[str, Any] = {}
        if self._tuner is not None:
            best = self._tuner.best_config
            if best.pre_hook is not None:
                return "the chosen config has a pre_hook"
            config = best.all_kwargs()
        knob_values = self._knobs(_knobs)
        if any(callable(v) for v in (knob_values if isinstance(knob_values, tuple) else (knob_values,))):
            return "a Triton hook knob is set"
        params = jit.params
        for name in kwargs:
            if name in self._names and not params[self._names.index(name)].is_constexpr:
                return f"{name} is passed by keyword but is not a constexpr"
        tail = []
        for p in params[len(args):]:  # bound as Triton binds: keyword, then the config's, then the default
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.name in config:
                tail.append(config[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return f"no value for {p.name}"
        problem = _compiled_as_keyed(params, args + tuple(tail), src)
        if problem is not None:
            return problem
        types = tuple(map(type, args))
        plan = self._plans.get(types)
        if plan is None:
            plan = self._plans[types] = self._plan(types)
        key = self._key(plan, args, kwargs)
        if len(plan.entries) >= MAX_ENTRIES:
            plan.entries.clear()
        meta = dict(zip(self._names[len(args):], tail, strict=True))
        plan.entries[key] = (compiled.run, compiled.function, compiled.packed_metadata, tuple(tail), meta, compiled)
        return None

    def _plan(self, types: tuple[type, ...]) -> _Plan:
        tensors, ints, values = [], [], []
        for i, t in enumerate(types):
            if self._constexpr[i]:
                values.append(i)
            elif t is int:
                ints.append(i)
            elif issubclass(t, torch.Tensor):
                tensors.append(i)
            else:
                values.append(i)
        values += [i for i in self._tuned_positions if i < len(types) and i not in values]
        return _Plan(tensors, ints, values)

    def entry(self, args: tuple, kwargs: dict) -> tuple | None:
        """``(run, function, packed_metadata, tail, meta)`` of the compiled kernel a launch with these arguments
        would take on the cache's path, or None (nothing cached: the interpreter, a refusal, a miss). ``tail``: the
        arguments after ``args`` (the config's and the defaults), ``meta``: them by name, as a grid reads them.
        A launch plan (``_plan.py``) takes it after the first launch of a signature it keys itself."""
        if self._plans is None or not ENABLED:
            return None
        try:
            plan = self._plans[tuple(map(type, args))]
            run, function, packed_metadata, tail, meta, _ = plan.entries[self._key(plan, args, kwargs)]
        except Exception:  # a miss, or an argument the key cannot hold
            return None
        return run, function, packed_metadata, tail, meta

    def clear(self) -> None:
        """Forget every cached kernel: the next launch of each specialization goes through Triton again."""
        if self._plans is not None:
            self._plans.clear()


def _compiled_as_keyed(params: list, bound: tuple, src: Any) -> str | None:
    """None if the compiled kernel's signature, constants and attributes are what the key says they are."""
    signature = list(src.signature.values())
    if len(signature) != len(bound):
        return f"the compiled signature has {len(signature)} parameters, the call bound {len(bound)}"
    constants, attrs = src.constants, getattr(src, "attrs", {})
    missing = object()
    for i, (p, value, ty) in enumerate(zip(params, bound, signature, strict=True)):
        attr = [tuple(a) for a in attrs.get((i,), ())]
        divisible = _DIVISIBLE_16 if not p.do_not_specialize and not p.do_not_specialize_on_alignment else []
        if p.is_constexpr or value is None or (type(value) is int and value == 1 and not p.do_not_specialize):
            ok = ty == "constexpr" and constants.get((i,), missing) == value
        elif type(value) is int:
            ok = ty == ("i32", "i64", "u64", None)[_int_range(value)] and attr == (divisible if value % 16 == 0
                                                                                  else [])
        elif isinstance(value, torch.Tensor):
            ok = ty == mangle_type(value) and attr == (divisible if value.data_ptr() % 16 == 0 else [])
        else:
            ok = ty == {bool: "u1", float: "fp32"}.get(type(value))
        if not ok:
            return f"{p.name}={value!r} was compiled as {ty} {attr}, not as this cache keys it"
    return None


def launch_counts() -> dict[str, int]:
    """Launches per kernel name through every ``CachedLauncher`` since the last reset, on either path."""
    return dict(_LAUNCHES)


def triton_path_counts() -> dict[str, int]:
    """The launches of ``launch_counts()`` that went through Triton's own path (misses, interpreter, opt-out)."""
    return dict(_TRITON_PATH)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
    _TRITON_PATH.clear()


@contextlib.contextmanager
def count_launches() -> Iterator[Counter[str]]:
    """``with count_launches() as n: ...``: ``n`` holds the launches per kernel name made inside the block."""
    before = Counter(_LAUNCHES)
    counts: Counter[str] = Counter()
    try:
        yield counts
    finally:
        counts.update(Counter(_LAUNCHES) - before)


def clear_caches() -> None:
    """Forget the compiled kernels of every launcher (e.g. after changing a knob or an autotuner's cache)."""
    for launcher in list(_ALL_LAUNCHERS):
        launcher.clear()
