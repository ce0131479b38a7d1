"""Deterministic counts of one call's host work: Python calls, Triton launches, aten ops and tensor allocations.

Timings move with the machine and its load; these counts do not, so tests can assert them.

- ``count_calls(fn)``: Python frames entered during ``fn()`` (``sys.setprofile`` ``call`` events: function calls
  and generator resumptions), C functions called from Python (``c_call`` events: builtins and methods written in
  C; calls of types such as ``tuple(...)`` are not reported), and of the Python frames, those whose code lies in
  the package (``fused_residual/`` or ``kernels/``, wherever they are installed), per function. List, dict and set
  comprehensions are not counted: from Python 3.12 on they run inline, without a frame. So the package count
  depends only on the package's code, not on the Python, torch or Triton version; the totals do depend on them.
  ``python_meta`` counts frames of PyTorch's Python meta kernels and decompositions (``torch/_meta_registrations.py``,
  ``torch/_decomp/``, ``torch/_refs/``, ``torch/_prims*/``): on meta tensors they mean PyTorch's C++ meta kernel
  was not the one that ran. ``sys.setprofile`` sees the calling thread only: work an autograd device thread does
  (CUDA backward) is not seen; on CPU and meta tensors backward runs on the calling thread.
- ``count_work(fn)``: Triton launches (the launch counters of ``kernels/_launch.py``: every launch through the
  package's launchers), the aten ops dispatched (a ``TorchDispatchMode``: every op that reaches the dispatcher,
  after autograd and CompositeImplicitAutograd decompositions), of those the ones that would launch device work
  (not views, not the allocation-only ``empty*`` ops), and allocations: tensors an op returns that alias none of
  its inputs (the op's schema says so: ``addmm`` and ``empty`` allocate, ``relu_``, ``t`` and ``out=`` variants
  do not). An allocation here is a new tensor, whether or not a caching allocator serves it from its pool.
  Under Triton's interpreter the kernels' bodies run as Python in ``kernels/`` and copy tensors with aten ops:
  count on real kernels (a GPU, or ``benchmarks/fake_gpu.py``).
- ``count_call(fn, setup=...)``: both, each on its own call of ``fn`` (the two instruments would see each other),
  with ``setup()`` before each call, not counted (e.g. setting gradients to None before a training step).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that only allocate (no kernel runs on a GPU).
ALLOCATION_ONLY = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"})
INLINED_COMPREHENSIONS = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})


def _folder(module_name: str) -> str:
    import importlib

    return os.path.realpath(os.path.dirname(importlib.import_module(module_name).__file__)) + os.sep


def package_folders() -> tuple[str, ...]:
    """The folders whose code counts as the package's: ``fused_residual/`` and ``kernels/`` as installed."""
    return _folder("fused_residual"), _folder("fused_residual.kernels")


def _torch_meta_prefixes() -> tuple[str, ...]:
    root = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
    return (root + "_meta_registrations.py", root + "_decomp" + os.sep, root + "_refs" + os.sep,
            root + "_prims" + os.sep, root + "_prims_common" + os.sep)


@dataclass(frozen=True)
class CallCounts:
    python: int
    """Python frames entered (calls and generator resumptions; comprehensions not counted)."""
    c: int
    """C functions called from Python."""
    package: int
    """Of ``python``: frames whose code is in the package."""
    python_meta: int
    """Of ``python``: frames of PyTorch's Python meta kernels and decompositions."""
    by_function: dict[str, int] = field(default_factory=dict)
    """Package frames per ``file:function`` (file relative to its package folder), most frequent first."""


@dataclass(frozen=True)
class WorkCounts:
    triton_launches: dict[str, int]
    """Launches per kernel name through the package's launchers."""
    aten_ops: dict[str, int]
    """Every aten op dispatched, per op name."""
    aten_launches: dict[str, int]
    """Of ``aten_ops``: the ones that would launch device work (not views, not allocation-only)."""
    allocations: int
    """Tensors created (op outputs that alias no input)."""

    @property
    def launches(self) -> int:
        """Kernel launches in all: Triton's plus aten's."""
        return sum(self.triton_launches.values()) + sum(self.aten_launches.values())


@dataclass(frozen=True)
class Counts:
    calls: CallCounts
    work: WorkCounts


def count_calls(fn: Callable[[], Any]) -> tuple[Any, CallCounts]:
    """``(fn(), counts of the Python and C calls it made)``; see the module docstring."""
    folders = package_folders()
    meta_prefixes = _torch_meta_prefixes()
    kinds: dict[str, tuple[int, str]] = {}  # file -> (0 other, 1 package, 2 torch meta; name relative to its folder)
    package: Counter[tuple[str, str]] = Counter()
    totals = [0, 0, 0, 0]  # python, c, package, meta

    def kind(filename: str) -> tuple[int, str]:
        path = os.path.realpath(filename)
        for folder in folders:
            if path.startswith(folder):
                return 1, os.path.basename(folder.rstrip(os.sep)) + "/" + path[len(folder):]
        return (2 if path.startswith(meta_prefixes) else 0), ""

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code.co_name in INLINED_COMPREHENSIONS:
                return
            totals[0] += 1
            found = kinds.get(code.co_filename)
            if found is None:
                found = kinds[code.co_filename] = kind(code.co_filename)
            if found[0] == 1:
                totals[2] += 1
                package[(found[1], code.co_qualname if hasattr(code, "co_qualname") else code.co_name)] += 1
            elif found[0] == 2:
                totals[3] += 1
        elif event == "c_call":
            totals[1] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(previous)
    # The setprofile call's own c_call event (reported on the way out) is not the call's.
    by_function = {f"{file}:{name}": n for (file, name), n in package.most_common()}
    return result, CallCounts(totals[0], max(0, totals[1] - 1), totals[2], totals[3], by_function)


class _AtenCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches: Counter[str] = Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if not func.is_view and name not in ALLOCATION_ONLY:
            self.launches[name] += 1
        returns = func._schema.returns
        values = out if len(returns) > 1 else (out,)
        for ret, value in zip(returns, values, strict=False):
            if ret.alias_info is None:
                self.allocations += sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value))
        return out


def count_work(fn: Callable[[], Any]) -> tuple[Any, WorkCounts]:
    """``(fn(), its Triton launches, aten ops, aten launches and allocations)``; see the module docstring."""
    from fused_residual.kernels import _launch

    counter = _AtenCounter()
    with _launch.count_launches() as launches, counter:
        result = fn()
    return result, WorkCounts(dict(launches), dict(counter.ops), dict(counter.launches), counter.allocations)


def count_call(fn: Callable[[], Any], setup: Callable[[], Any] | None = None, warmup: int = 1) -> Counts:
    """Counts of one call of ``fn`` after ``warmup`` calls, each instrument on a call of its own, ``setup()`` (not
    counted) before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if setup is not None:
        setup()
    _, calls = count_calls(fn)
    if setup is not None:
        setup()
    _, work = count_work(fn)
    return Counts(calls, work)
