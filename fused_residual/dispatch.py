"""Every decision of which code computes a block call, in one place: the mode, the route and the kernel variant.

A call of the block goes one of these ways (``route``), decided here and nowhere else:

1. ``torch.compile`` tracing: where a backend of ours may run the call (``ours_may_run``: one is forced, or ``auto``
   may pick the Triton kernels at some batch size), the custom ops that ``ops.py`` registers (opaque to the
   compiler, ``REGISTERED_OP``), whose backend is chosen when they run; elsewhere the plain composite, which the
   compiler fuses as it fuses the reference. This choice is made when the graph is traced, so a compiled model
   keeps it until it is compiled again (``torch._dynamo.reset()``). ``torch.export`` tracing: the plain
   composite, an aten-only graph for ONNX, AOTInductor and other runtimes.
2. ``torch.func`` transforms active: the plain composite (``composite.py``), differentiable ops that the transforms
   see through. A backward that builds a graph (``create_graph=True``) differentiates through the same composite
   (``backward_builds_graph``).
3. Otherwise a ``Route`` from ``backend_route``: a backend (and the kernel variant it should use) under the block's
   ``autograd.Function`` when a gradient is needed or called directly when not; or ``COMPOSITE``, the plain
   composite under PyTorch's own autograd, where that is cheaper than a Function.

Which backend: ``FUSED_RESIDUAL_BACKEND`` (read at every call, so tests and users can switch at run time):

- ``auto`` (default): the measured winner for the call's (device, dtype, width, row bucket, forward/training) in
  the dispatch tables below, else the conservative rule: on a GPU the Triton kernels only where a measurement
  found them faster, the cuBLAS composite elsewhere; on the CPU the ``torch`` backend or the plain composite.
- the name of a registered backend (``torch``, ``triton``), optionally with one of its kernel variants
  (``triton:two_gemm``): always that backend. A forced backend that cannot run the call raises RuntimeError saying
  why, never a silent fallback. The Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``.
- ``composite``: always the plain composite (the reference's own ops under PyTorch's autograd).

Which kernel variant (``kernel_variants``): the one asked for (or the backend's first) where the backend says it
takes the call (``Backend.takes``), else the backend's last, general one; forward and backward separately (the
whole-block backward takes narrower widths than its forward).

Dispatch tables (their format and where they are read from: ``tables.py``) are matched by device: a table of the
same device name is preferred to one of the same device family (``kernels/_common.py``'s ``family``, which the
table names); never one of the same compute capability alone (an MI250X reads (9, 0), like an H100). For a call,
the entry of the same dtype, widths and mode whose row bucket is nearest (in powers of two) decides.

Each decision is made once per call signature and cached (``backend_route``), with its reason (``decide``: a
table's entry, the rule, the variable), logged then at DEBUG level on the ``fused_residual`` logger.

Without an entry, the conservative rule decides (``conservative``): it takes the Triton kernels only where the
first GPU measurement (H200, commit 44834e3, ``benchmarks/results`` and the design notes) found them faster in
wall time per call, on the family it was measured on (``hopper``) and nowhere else, and the vendor library's
composite (cuBLAS, hipBLASLt) everywhere else, since the composite runs the reference's own ops. A family without
measured wins (every AMD one among them) so gets PyTorch's own ops for every call.

Where ``auto`` picks the Triton kernels on a family they have not run on in hardware (``RAN_ON_HARDWARE``), a
kernel that fails to compile or launch on the first call of a signature sends that signature to the torch backend,
with one warning (``fall_back``); a forced backend raises instead.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import backends
from . import tables as _tables
from .activations import REFERENCE_FORM, Form
from .kernels._common import FAMILIES, capability, family, is_gpu
from .tables import (  # noqa: F401 (the format's names, read here by tune and the tests)
    CACHE_ENV_VAR,
    CANDIDATES,
    DTYPE_NAMES,
    FORMAT,
    MODES,
    SHIPPED,
    TABLE_ENV_VAR,
    Table,
    bucket,
    padded,
    parse,
    skipped_tables,
    tables,
    user_cache_dir,
)

if TYPE_CHECKING:
    from torch import Tensor

    from .backends import Backend

def device_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) a table records: the GPU's, or ("cpu", (0, 0)) for any CPU."""
    if is_gpu(device):
        return torch.cuda.get_device_name(device), tuple(capability(device))
    return device.type, (0, 0)


def device_family(device: torch.device) -> str | None:
    """The family a table of ``device`` names and is matched by: a GPU's known family, else None (the CPU, or a GPU
    of no known family, whose tables match by device name only)."""
    if not is_gpu(device):
        return None
    name = family(device).name
    return name if name in FAMILIES else None


@functools.cache
def _device_tables(device: torch.device) -> tuple[Table, ...]:
    """The tables for ``device``: of its name first, then of its family; never of its capability alone."""
    name = device_identity(device)[0]
    fam = device_family(device)
    same_name = [t for t in tables() if t.device == name]
    same_family = [t for t in tables() if t.device != name and fam is not None and t.family == fam]
    return tuple(same_name + same_family)


def lookup(found: tuple[Table, ...], dtype: torch.dtype, width: int, hidden: int, rows: int, mode: str) -> str | None:
    """The winner of the nearest measured row bucket in the first table that has this (dtype, widths, mode)."""
    entry = _lookup_entry(found, dtype, width, hidden, rows, mode)
    return None if entry is None else entry[0]


def _lookup_entry(found: tuple[Table, ...], dtype: torch.dtype, width: int, hidden: int, rows: int,
                  mode: str) -> tuple[str, str] | None:
    """``lookup``'s winner and the entry it comes from, in words."""
    key = (DTYPE_NAMES.get(dtype, str(dtype)), padded(width), padded(hidden), mode)
    target = bucket(rows).bit_length()
    for table in found:
        measured = table.entries.get(key)
        if measured:
            nearest = min(measured, key=lambda b: (abs(b.bit_length() - target), b))
            return measured[nearest], (f"measured table {table.source} ({table.device}), entry {key[0]} width "
                                       f"{key[1]} hidden {key[2]} {mode} rows {nearest}")
    return None


# The first GPU measurement's wall-time wins of the Triton kernels (H200, torch 2.11, triton 3.6, 2026-11-26,
# benchmarks/results/h200-2026-11-26-44834e3): the whole-block forward at width 128 and 65536 rows, bf16 1.56x and
# fp16 1.39x. It lost at widths 32 and 64 (host cost per launch), every two-GEMM shape and every training step.
# Keyed by the family measured: they hold for Hopper alone (another family's shared memory, tiles and launch
# costs differ, and none was measured).
MEASURED_WINS = {"hopper": {("forward", torch.bfloat16, 128), ("forward", torch.float16, 128)}}
MEASURED_ROWS = 1 << 16
# CPU (``python -m fused_residual.tune --device cpu``, two runs on a 2-core EPYC, results/cpu-2026-11-26-76e4445/tune):
# below this row bucket the block's Function costs more than it saves (training 16 x 16: 0.85x the reference's
# wall time, the composite 0.95x; forward the composite 1.1-1.2x); from it on the torch backend's fewer passes
# over memory win (training 65536 x 32: 1.19x, 4096 x 256: 1.13x).
CPU_FUNCTION_ROWS = 1 << 12


# Families whose kernels have run on hardware (the H200 run above): on every other family a kernel that fails
# to compile or launch where ``auto`` picked it makes that signature fall back to the torch backend (``fall_back``).
RAN_ON_HARDWARE = {"hopper"}


def conservative(family_name: str | None, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
                 training: bool) -> str:
    """The rule where no table has an entry, for a GPU of ``family_name`` (``_common.Family.name``; None: the CPU).
    GPU: the measured Triton wins of its family (``MEASURED_WINS``), else the vendor library's composite (the torch
    backend without autograd; in training the reference's own ops under PyTorch's autograd). CPU: the torch
    backend from ``CPU_FUNCTION_ROWS`` rows on, the composite below."""
    return _conservative(family_name, dtype, width, hidden, rows, projection, training)[0]


def _conservative(family_name: str | None, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
                  training: bool) -> tuple[str, str]:
    """``conservative``'s choice and why."""
    mode = "train" if training else "forward"
    if family_name is None:
        if bucket(rows) >= CPU_FUNCTION_ROWS:
            return "torch", f"conservative rule: on the CPU the torch backend from {CPU_FUNCTION_ROWS} rows"
        return "composite", (f"conservative rule: on the CPU the plain composite below {CPU_FUNCTION_ROWS} rows "
                             "(the Function would cost more than it saves)")
    if (not projection and width == hidden and (mode, dtype, padded(width)) in MEASURED_WINS.get(family_name, ())
            and rows >= MEASURED_ROWS):
        return "triton:whole_block", (f"conservative rule: the first GPU run measured the whole block faster here "
                                      f"({mode}, width {padded(width)}, {DTYPE_NAMES[dtype]}, from {MEASURED_ROWS} "
                                      "rows)")
    return ("composite" if training else "torch"), ("conservative rule: on a GPU the cuBLAS composite wherever no "
                                                    "measurement found the Triton kernels faster")


def _family_name(device: torch.device) -> str | None:
    return family(device).name if is_gpu(device) else None


def winner(device: torch.device, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
           training: bool) -> str:
    """The implementation for a reference-form block call on ``device``: a table's winner, else the rule."""
    return _winner(device, dtype, width, hidden, rows, projection, training)[0]


def _winner(device: torch.device, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
            training: bool) -> tuple[str, str]:
    """``winner``'s choice and why."""
    if not projection:
        entry = _lookup_entry(_device_tables(device), dtype, width, hidden, rows, "train" if training else "forward")
        if entry is not None:
            return entry
    found, why = _conservative(_family_name(device), dtype, width, hidden, rows, projection, training)
    return found, why + (" (a projection block: no table measures one)" if projection else " (no table entry)")


# ---- routes ---------------------------------------------------------------------------------------------------

ENV_VAR = "FUSED_RESIDUAL_BACKEND"
AUTO = "auto"
COMPOSITE_CHOICE = "composite"


class Route(NamedTuple):
    """Who computes a call: a backend and the kernel variant asked of it, or (``backend`` None) the plain composite,
    or (``op``) the custom ops that ``ops.py`` registers for ``torch.compile``. ``may_fall_back``: ``auto`` picked
    the Triton kernels on a family they have not run on in hardware (``fall_back``)."""

    backend: Backend | None
    variant: str | None = None
    op: bool = False
    may_fall_back: bool = False

    @property
    def name(self) -> str:
        if self.backend is None:
            return "registered op" if self.op else "composite"
        return self.backend.NAME if self.variant is None else f"{self.backend.NAME}:{self.variant}"


COMPOSITE = Route(None)
REGISTERED_OP = Route(None, op=True)

_parsed: tuple[str | None, str] = (None, AUTO)  # (raw value, choice): parse only when the variable changes
_routes: dict[tuple, Route] = {}
_log = logging.getLogger("fused_residual")
_on_reset: list = []
_functorch_active = torch._C._are_functorch_transforms_active  # torch.func transforms on: a C call


def requested() -> str:
    """The choice ``FUSED_RESIDUAL_BACKEND`` asks for: ``auto``, ``composite``, a registered backend's name, or
    ``name:variant`` (e.g. ``triton:two_gemm``) to force one of its kernel variants. Validated."""
    global _parsed
    raw, parsed = os.environ.get(ENV_VAR), _parsed  # one read of the pair: another thread may replace it
    if raw == parsed[0]:
        return parsed[1]
    choice = (raw or AUTO).strip().lower() or AUTO
    if choice not in (AUTO, COMPOSITE_CHOICE) and choice.partition(":")[0] not in backends.names():
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join((AUTO, COMPOSITE_CHOICE, *backends.names()))}"
                         " (a backend optionally as name:variant)")
    _parsed = (raw, choice)
    return choice


def forced(choice: str, device: torch.device, dtype: torch.dtype, form: Form) -> Route:
    """The route of a forced ``name[:variant]``, or RuntimeError (ValueError for an unknown variant) saying why
    it cannot run this call."""
    name, _, variant = choice.partition(":")
    missing = backends.missing_requirement(name)
    why = f"the {missing} package is not installed (pip install {missing})" if missing else None
    backend = None
    if why is None:
        backend = backends.get(name)
        if variant and variant not in backend.VARIANTS:
            raise ValueError(f"{ENV_VAR}={choice}: the {name} backend has no variant {variant!r} "
                             f"(it has: {', '.join(backend.VARIANTS) or 'none'})")
        why = backend.unavailable(device, dtype, form)
    if why is not None:
        raise RuntimeError(f"{ENV_VAR}={name} was forced but the {name} backend cannot run this call: {why}")
    return Route(backend, variant or None)


def route(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool, recompute: bool = False) -> Route:
    """The way a block call on ``x (..., K)`` with ``w1 (H, K)`` is computed: while ``torch.compile`` traces, the
    registered ops where a backend of ours may run the call, else the composite, which the compiler fuses as it
    fuses the reference; the composite while ``torch.export`` traces or ``torch.func`` transforms are on; else
    ``backend_route``. A recompute block in training (``recompute``) needs the block's Function (or the ops) to
    keep less than the composite: where ``auto`` would take the composite, it takes the torch backend."""
    recomputes = recompute and training
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():
            return COMPOSITE
        # The weights' widths (x's width is w1's in-features): a parameter's shape stays static where a compiled
        # batch dimension turns dynamic.
        width, hidden = int(w1.shape[1]), int(w1.shape[0])  # int(): specialised where dynamic, as the graph is
        ours = ours_may_run(os.environ.get(ENV_VAR), x.device, w1.dtype, width, hidden, ws is not None, form, training,
                            recomputes)
        return REGISTERED_OP if ours else COMPOSITE
    if _functorch_active():
        return COMPOSITE
    chosen = backend_route(x, w1, ws, form, training)
    if recomputes and chosen.backend is None and requested() == AUTO:
        return Route(backends.get("torch"))
    return chosen


@torch.compiler.assume_constant_result
def ours_may_run(raw_choice: str | None, device: torch.device, dtype: torch.dtype, width: int, hidden: int,
                 projection: bool, form: Form, training: bool, recomputes: bool = False) -> bool:
    """Whether a compiled graph should hold the registered ops (which choose a backend at run time) rather than the
    plain composite: where a backend is forced, where ``auto`` may pick the Triton kernels at some batch size, or
    for a recompute block in training (the composite would keep what eager keeps).
    Decided when the graph is traced (``torch.compile`` calls this once and keeps the answer): a compiled model
    keeps it until it is compiled again."""
    choice = (raw_choice or AUTO).strip().lower() or AUTO
    if choice != AUTO:
        return choice != COMPOSITE_CHOICE
    if recomputes:
        return True
    if form != REFERENCE_FORM or projection or not is_gpu(device) or backends.missing_requirement("triton") is not None:
        return False
    mode = "train" if training else "forward"
    key = (DTYPE_NAMES.get(dtype, str(dtype)), padded(width), padded(hidden), mode)
    if any(w.startswith("triton") for table in _device_tables(device) for w in table.entries.get(key, {}).values()):
        return True
    return width == hidden and (mode, dtype, padded(width)) in MEASURED_WINS.get(family(device).name, ())


def backend_route(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool) -> Route:
    """The backend (or the composite) for a block call; decisions are cached per call signature (what varies per
    call is only the batch size, bucketed)."""
    choice = requested()
    width = x.shape[-1]
    rows_ = x.numel() // width if width else 0
    key = (choice, x.device, x.dtype, w1.dtype, (rows_ - 1).bit_length(), width, w1.shape[0], ws is None, form,
           training)  # (rows - 1).bit_length(): the row bucket's exponent (bucket)
    chosen = _routes.get(key)
    if chosen is None:  # a new signature: decided (and logged) once
        chosen, why = decide(choice, x, w1, ws, form, training)
        _routes[key] = chosen
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("route %s for a block of width %d, hidden %d, %s, activation %s, final %s, %d rows, %s on %s: "
                       "%s", chosen.name, width, w1.shape[0], "projection" if ws is not None else "identity shortcut",
                       form.activation, form.final_activation, rows_, "train" if training else "forward", x.device,
                       why)
    return chosen


def decide(choice: str, x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool) -> tuple[Route, str]:
    """The route of a call under ``choice`` (``requested()``) and why, decided afresh (no cache read or written)."""
    if choice == AUTO:
        width = x.shape[-1]
        return _auto(x, w1, ws, form, training, x.numel() // width if width else 0)
    if choice == COMPOSITE_CHOICE:
        return COMPOSITE, f"forced by {ENV_VAR}={choice}"
    return forced(choice, x.device, w1.dtype, form), f"forced by {ENV_VAR}={choice}"


def _auto(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool, rows_: int) -> tuple[Route, str]:
    """``auto``: the dispatch tables' winner for a reference-form call (``winner``), among the candidates that can run
    it; the conservative rule for other forms and where the Triton kernels cannot run. With why."""
    dtype, device = w1.dtype, x.device
    family_name = _family_name(device)
    triton_backend, why_not = None, "no GPU"
    if family_name is not None and (missing := backends.missing_requirement("triton")) is None:
        triton_backend = backends.get("triton")
        if (why_not := triton_backend.unavailable(device, dtype, form)) is not None:
            triton_backend = None
        elif signature(x, w1, ws, form) in _failed:
            triton_backend, why_not = None, "they failed on an earlier call of this signature"
    elif family_name is not None:
        why_not = f"{missing} is not installed"
    if form == REFERENCE_FORM:
        found, why = _winner(device, dtype, x.shape[-1], w1.shape[0], rows_, ws is not None, training)
    else:  # only the reference form was measured: the rule's non-Triton choice (projection=True never takes Triton)
        found, why = _conservative(family_name, dtype, x.shape[-1], w1.shape[0], rows_, True, training)
        why += f" (only the reference block's form was measured, not {form.activation}/{form.final_activation})"
    if found.startswith("triton"):
        if triton_backend is not None:
            return Route(triton_backend, found.partition(":")[2] or None,
                         may_fall_back=family_name not in RAN_ON_HARDWARE), why
        picked, (found, rule) = found, _conservative(family_name or "", dtype, 0, 0, 0, True, training)
        why = f"{rule}; {why} picked {picked}, but the Triton kernels cannot run here ({why_not})"
    return (COMPOSITE if found == "composite" else Route(backends.get("torch"))), why


# Signatures whose kernels failed where ``auto`` picked them on a family they have not run on (``fall_back``).
_failed: set[tuple] = set()


def signature(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form) -> tuple:
    """A block call's signature for ``fall_back``: device, dtypes, widths, projection or not, form (any row count)."""
    return x.device, x.dtype, w1.dtype, x.shape[-1], w1.shape[0], ws is None, form


def fall_back(chosen: Route, failed: tuple, error: Exception) -> Route:
    """The route that replaces ``chosen`` after its kernels raised ``error`` on a call of signature ``failed``
    (``signature``): the torch backend, where ``auto`` picked the Triton kernels on a family they have not run on in
    hardware (``Route.may_fall_back``), with one warning per signature; every later call of the signature takes the
    torch backend too (the plans and the routes are forgotten). Anywhere else (a forced backend, a verified family)
    ``error`` is raised."""
    if not chosen.may_fall_back:
        raise error
    if failed not in _failed:
        _failed.add(failed)
        device, width = failed[0], failed[3]
        warnings.warn(f"fused_residual: the Triton kernels failed on {_family_name(device)} ({device}) for a block of "
                      f"width {width} ({type(error).__name__}: {str(error)[:300]}); this call and later ones of its "
                      "shape and dtypes run the torch backend (FUSED_RESIDUAL_BACKEND=triton raises instead)",
                      stacklevel=3)
        _forget_routes()
    return Route(backends.get("torch"))


def _forget_routes() -> None:
    _routes.clear()
    for callback in _on_reset:
        callback()


def kernel_variants(chosen: Route, x: Tensor, w1: Tensor, ws: Tensor | None, form: Form,
                    grad_dtype: torch.dtype | None) -> tuple[str | None, str | None]:
    """(forward variant, backward variant) that ``chosen``'s backend is told to run: the variant asked for (or
    the backend's first) where the backend takes the call, else its last, general one; None for a backend without
    variants. ``grad_dtype``: the dtype of the output's gradient (None: no backward)."""
    backend = chosen.backend
    if backend is None or not backend.VARIANTS:
        return None, None
    wanted, general = chosen.variant or backend.VARIANTS[0], backend.VARIANTS[-1]
    forward = wanted if backend.takes(wanted, x, w1, ws, form, None) else general
    backward = None
    if grad_dtype is not None:
        backward = wanted if backend.takes(wanted, x, w1, ws, form, grad_dtype) else general
    return forward, backward


def net_as_one(chosen: Route, x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list, w_out: Tensor,
               b_out: Tensor | None) -> bool:
    """Whether a net without autograd runs as one unit (``Backend.net_forward``) on a forced backend: where no
    kernel variant is forced and the backend takes the net (``takes_net``); else layer by layer."""
    backend = chosen.backend
    return backend is not None and not chosen.variant and backend.takes_net(x, w_in, b_in, blocks, w_out, b_out)


def backward_builds_graph() -> bool:
    """Whether the running backward builds a graph (``create_graph=True``: double backward, gradient penalties):
    then it differentiates through the plain composite (``composite.block_grads``), not the kernels."""
    return torch.is_grad_enabled()


def on_reset(callback) -> None:
    """Call ``callback()`` whenever ``reset`` runs (the plans built on cached decisions subscribe)."""
    _on_reset.append(callback)


def reset() -> None:
    """Forget cached decisions and tables (after a dispatch table or backend registration changes)."""
    global _parsed
    _tables.forget()
    _device_tables.cache_clear()
    _failed.clear()
    _parsed = (None, AUTO)
    _forget_routes()
