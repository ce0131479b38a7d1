"""Straight-line replay: a recorded step list (``_plan.py``) as one generated Python function.

The step-by-step replay (``_steps._run``) pays, per step, a Python frame, a type test, attribute loads and tuple
unpacking: about a microsecond per launch and a fifth of one per allocation, on a call whose whole budget is a few
tens of microseconds. Once every launch of a list has its compiled kernel, the list is written out as the source
of one function, each step's ``emit`` giving what its ``__call__`` does on a compiled launch (a stream to launch
on) with the step's constants in place (sizes, grid forms, the launch's fixed arguments as literals), and
compiled once. Two forms, one per ``Source``:

- ``compile_function``: a ``Steps``' whole call, ``replay(r0, ..., rN)`` on its inputs, registers as locals, its
  head (the checks that pick the stream, else the step-by-step path) written in, the results returned; a family's
  members (``_plan.Family``) that compiled are written in as branches on the row-count key;
- ``compile_steps``: ``replay(rows, regs, stream)`` over a register list (a family member beyond those).

Steps whose work is not worth writing out (a torch op, a cached buffer's miss) run the step itself on a register
list, and the interpreter stays for Triton's own path (no stream: the interpreter, a launch hook, another current
device). The source is readable: ``source=True`` returns it.
"""

from __future__ import annotations

import collections
import itertools
import linecache
import math
import os
from collections.abc import Callable

INLINE_MEMBERS = 4  # a family's members written into a Steps' function; later ones run through the family


class Source:
    """How steps spell their registers: the locals ``r{i}`` (``local``) or ``regs[i]``; ``space`` holds the
    objects the source names."""

    def __init__(self, space: dict, n_regs: int, local: bool):
        self.space, self.n_regs, self.local = space, n_regs, local
        self.captured = False  # whether ``capturing`` is set on every path to the line being written

    def capturing(self) -> list[str]:
        """Lines that set ``capturing`` (whether the current stream is capturing a CUDA graph) where it is not yet
        set: asked once per call however many cached buffers the steps look up."""
        if self.captured:
            return []
        self.captured = True
        return ["capturing = _capturing()"]

    def reg(self, i: int) -> str:
        return f"r{i}" if self.local else f"regs[{i}]"

    def run_step(self, name: str, writes: tuple[int, ...], grows: bool = False) -> list[str]:
        """Lines that run the step bound to ``name`` itself (its ``__call__`` on a register list); ``grows``: a
        family, whose members met later may have named registers past these (``_names``: all the names)."""
        if not self.local:
            return [f"{name}(rows, regs, stream)"]
        every = ", ".join(f"r{i}" for i in range(self.n_regs))
        pad = [f"regs += [None] * (len(_names) - {self.n_regs})"] if grows else []
        return [f"regs = [{every}]", *pad, f"{name}(rows, regs, stream)", *(f"r{i} = regs[{i}]" for i in writes)]

    def spelled(self, values: tuple, prefix: str) -> list[str]:
        """Source for each of ``values``: its literal where ``is_literal``, else a name bound to it."""
        names = []
        for i, value in enumerate(values):
            if is_literal(value):
                names.append(repr(value))
            else:
                names.append(f"{prefix}{i}")
                self.space[names[-1]] = value
        return names

    def body(self, steps: list, prefix: str = "s") -> list[str] | None:
        """The lines of ``steps`` (each bound to ``{prefix}{j}``); None while one cannot be written out yet."""
        lines = []
        captured = self.captured  # what a branch (a family's member) sets is not set after it
        for j, step in enumerate(steps):
            name = f"{prefix}{j}"
            self.space[name] = step
            emitted = step.emit(name, self)
            if emitted is None:
                self.captured = captured
                return None
            lines += emitted
        self.captured = captured
        return lines


def written(steps: list) -> tuple[int, ...]:
    """The registers ``steps`` write (a step's ``index``, a family's members' registers)."""
    found: set[int] = set()
    for step in steps:
        if hasattr(step, "written"):
            found.update(step.written())
        elif getattr(step, "index", None) is not None:
            found.add(step.index)
    return tuple(sorted(found))


def compile_steps(steps: list, space: dict, source: bool = False) -> Callable | str | None:
    """A function ``replay(rows, regs, stream)`` doing what running ``steps`` one by one does when ``stream`` is
    not None; None while one of them cannot be written out yet (a launch without its compiled kernel)."""
    body = Source(space, 0, False).body(steps)
    if body is None:
        return None
    return _define(["def replay(rows, regs, stream):", *("    " + line for line in body), "    return None"],
                   space, source)


def compile_function(steps: list, space: dict, n_inputs: int, n_regs: int, results: tuple[int | None, ...],
                     head: list[str], source: bool = False) -> Callable | str | None:
    """``replay(r0, ..., r{n_inputs - 1})`` doing a whole call: ``head`` (sets ``rows`` and ``stream``, or returns
    another way's result), ``steps`` over local registers, then the registers ``results`` (None: None)."""
    src = Source(space, n_regs, True)
    body = src.body(steps)
    if body is None:
        return None
    inputs = ", ".join(f"r{i}" for i in range(n_inputs))
    blank = [" = ".join([*(f"r{i}" for i in range(n_inputs, n_regs)), "None"])] if n_regs > n_inputs else []
    returned = ", ".join("None" if r is None else f"r{r}" for r in results)
    lines = [f"def replay({inputs}):", *("    " + line for line in [*head, *blank, *body]),
             f"    return ({returned},)"]
    return _define(lines, space, source)


def _define(lines: list[str], space: dict, source: bool) -> Callable | str:
    text = "\n".join(lines)
    if source:
        return text
    # A file name in this folder (the package's code, for profilers and frame counts), its source in linecache (for
    # tracebacks; the latest ``MAX_SOURCES`` of them).
    filename = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"<replay {next(_COUNT)}>")
    linecache.cache[filename] = (len(text), None, [line + "\n" for line in lines], filename)
    _SOURCES.append(filename)
    if len(_SOURCES) > MAX_SOURCES:
        linecache.cache.pop(_SOURCES.popleft(), None)
    exec(compile(text, filename, "exec"), space)  # noqa: S102
    return space["replay"]


MAX_SOURCES = 1024
_COUNT = itertools.count()
_SOURCES: collections.deque[str] = collections.deque()


def is_literal(value) -> bool:
    """Whether ``repr(value)`` is a Python literal of the same value (ints, bools, None, strings, finite floats)."""
    if value is None or type(value) in (bool, int, str):
        return True
    return type(value) is float and math.isfinite(value)


def indented(lines: list[str]) -> list[str]:
    return ["    " + line for line in lines]
