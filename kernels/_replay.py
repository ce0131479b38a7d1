"""Straight-line replay: a recorded step list (``_plan.py``) as one generated Python function.

The step-by-step replay (``_plan._run``) pays, per step, a Python frame, a type test, attribute loads and tuple
unpacking: about a microsecond per launch and a fifth of one per allocation, on a call whose whole budget is a few
tens of microseconds. Once every launch of a list has its compiled kernel, ``compile_steps`` writes the list out
as the source of one function, each step's ``emit`` giving what its ``__call__`` does on a compiled launch (a
stream to launch on) with the step's constants in place (sizes, grid forms, the launch's fixed arguments as
literals), and compiles it once. The source is readable: ``compile_steps(steps, space, source=True)`` returns it.
Steps whose work is not worth writing out (a torch op, a cached buffer's miss) call the step itself, and the
interpreter stays for Triton's own path (no stream: the interpreter, a launch hook, another current device).
"""

from __future__ import annotations

import collections
import itertools
import linecache
import math
import os
from collections.abc import Callable


def compile_steps(steps: list, space: dict, source: bool = False) -> Callable | str | None:
    """A function ``replay(rows, regs, stream)`` doing what running ``steps`` one by one does when ``stream`` is
    not None, from the steps' ``emit(name, space)`` (each adds the objects its source names to ``space``); None
    while one of them cannot be written out yet (a launch without its compiled kernel)."""
    lines = ["def replay(rows, regs, stream):"]
    for j, step in enumerate(steps):
        name = f"s{j}"
        space[name] = step
        body = step.emit(name, space)
        if body is None:
            return None
        lines += ["    " + line for line in body]
    lines.append("    return None")
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


def spelled(values: tuple, prefix: str, space: dict) -> list[str]:
    """Source for each of ``values``: its literal where ``is_literal``, else a name bound to it in ``space``."""
    names = []
    for i, value in enumerate(values):
        if is_literal(value):
            names.append(repr(value))
        else:
            names.append(f"{prefix}{i}")
            space[names[-1]] = value
    return names
