"""A compiled kernel's launch without Triton's Python launcher, where that provably makes the same C call.

Triton launches a compiled kernel through ``CompiledKernel.run``, an instance of the active driver's launcher
class (``CudaLauncher`` on NVIDIA), whose ``__call__`` builds two closures, asks the allocators for the global and
profile scratch a kernel may need, checks the gsan instrumentation and calls the C launcher (``utils.launch`` on
triton 3.9, the generated per-kernel module on 3.6): about a microsecond and a half of Python per launch on a GPU
host. A launch plan (``_plan.py``) makes the same C call itself with the parts fixed at its first launch
(``DirectLaunch``): the same arguments in the same order, the global scratch from Triton's allocator as Triton asks
for it (``per_program * g0 * g1 * g2`` bytes, its alignment, the stream), the profile scratch None.

Only where that is provably what Triton does: the launcher class's ``__call__`` must have one of the sources read
here (a feature test on the launcher itself: its whitespace-free source hashed, ``_KNOWN_LAUNCHERS``), the kernel
no gsan instrumentation and no profile scratch. Anything else (HIP's launcher, a Triton whose launcher changed)
keeps Triton's own ``run`` for every launch.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from typing import Any, NamedTuple

# sha256 (first 16 hex digits) of the launcher's ``__call__`` source with whitespace removed -> its form:
# "args" (triton 3.6.0: launch metadata, hooks and the bound arguments splatted after the scratch) or "tuple"
# (triton 3.9.0: metadata and hooks before the scratch, then argument annotations, the kernel signature and the
# bound arguments as one tuple).
_KNOWN_LAUNCHERS = {"0ff2b3219ec9f506": "args", "b3d689acc085368a": "tuple"}


class DirectLaunch(NamedTuple):
    """``launch(g0, g1, g2, stream, *before, scratch, None, *after, *bound)`` (``packed``: ``bound`` as one
    tuple), ``scratch`` = None, or where ``per_program`` > 0 ``allocator(per_program * g0 * g1 * g2, align,
    stream)``."""

    launch: Any
    before: tuple
    after: tuple
    packed: bool
    per_program: int
    align: int


@functools.cache
def launcher_form(cls: type) -> str | None:
    """The form of ``cls.__call__`` among ``_KNOWN_LAUNCHERS``, or None."""
    try:
        source = re.sub(r"\s+", "", inspect.getsource(cls.__call__))
    except (OSError, TypeError):
        return None
    return _KNOWN_LAUNCHERS.get(hashlib.sha256(source.encode()).hexdigest()[:16])


def direct_launch(run: Any, function: Any, packed_metadata: Any) -> DirectLaunch | None:
    """The C call that ``run(g0, g1, g2, stream, function, packed_metadata, None, None, None, *bound)`` makes (no
    launch metadata, no hooks), taken apart; None where it cannot be proven the same (module docstring)."""
    form = launcher_form(type(run))
    if form is None or getattr(run, "gsan_enabled", False) or run.profile_scratch_size:
        return None
    flags = (function, run.launch_cooperative_grid, run.launch_pdl)
    per_program, align = run.global_scratch_size * run.num_ctas, run.global_scratch_align
    if form == "tuple":
        return DirectLaunch(run.launch, (*flags, packed_metadata, None, None, None),
                            (run.arg_annotations, run.kernel_signature), True, per_program, align)
    return DirectLaunch(run.launch, flags, (packed_metadata, None, None, None), False, per_program, align)
