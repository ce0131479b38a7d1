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

Dispatch tables are JSON files written by ``python -m fused_residual.tune`` on a GPU: the device, its compute
capability, the torch/triton versions, the date and commit they were measured at, and one entry per measured
(dtype, padded width, padded hidden width, row bucket, mode) with every candidate's wall time per call and the
winner. Tables are read from, in this order: the file named by ``FUSED_RESIDUAL_DISPATCH_TABLE``, the user's
tuned tables (``~/.cache/fused_residual/`` or ``$FUSED_RESIDUAL_CACHE``), and the tables shipped in
``fused_residual/dispatch_tables/``. A table of the same device name is preferred to one of the same compute
capability. For a call, the entry of the same dtype, widths and mode whose row bucket is nearest (in powers of
two) decides. A table found in those folders that cannot be read (not JSON, not this format, a bad entry) is
skipped with a warning naming the file and why; the file named by ``FUSED_RESIDUAL_DISPATCH_TABLE`` must be
readable: otherwise every ``auto`` call raises a ValueError naming the file, the variable and why.

Without an entry, the conservative rule decides (``conservative``): it takes the Triton kernels only where the
first GPU measurement (H200, commit 44834e3, ``benchmarks/results`` and the design notes) found them faster in
wall time per call, and the cuBLAS composite everywhere else, since the composite runs the reference's own ops.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import backends
from .activations import SEED_FORM, Form
from .kernels._common import capability, is_gpu

if TYPE_CHECKING:
    from torch import Tensor

    from .backends import Backend

CANDIDATES = ("triton:whole_block", "triton:two_gemm", "torch", "composite")
MODES = ("forward", "train")
TABLE_ENV_VAR = "FUSED_RESIDUAL_DISPATCH_TABLE"
CACHE_ENV_VAR = "FUSED_RESIDUAL_CACHE"
SHIPPED = Path(__file__).with_name("dispatch_tables")
FORMAT = 1

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (>= 1): the row bucket of a call."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded(width: int) -> int:
    return max(16, bucket(width))


@dataclass(frozen=True)
class Table:
    device: str
    capability: tuple[int, int]
    source: str
    entries: dict[tuple[str, int, int, str], dict[int, str]]
    """(dtype, padded width, padded hidden, mode) -> {row bucket: winner}"""


def user_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "fused_residual")


def parse(data: object, source: str) -> Table:
    """A table from its JSON value; ValueError naming ``source`` and what is wrong if it is not one this version
    reads."""
    try:
        return _parse(data, source)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _parse(data: object, source: str) -> Table:
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not a dispatch table (an object)")
    if data.get("format") != FORMAT:
        raise ValueError(f"dispatch table format {data.get('format')!r}, expected {FORMAT}")
    device, cap, raw_entries = data.get("device"), data.get("capability"), data.get("entries")
    if not isinstance(device, str):
        raise ValueError(f"device {device!r} is not a device name")
    if not (isinstance(cap, list) and len(cap) == 2 and all(type(c) is int for c in cap)):
        raise ValueError(f"capability {cap!r} is not [major, minor]")
    if not isinstance(raw_entries, list):
        raise ValueError(f"entries {type(raw_entries).__name__ if raw_entries is not None else 'missing'}, "
                         "expected a list")
    dtypes = set(DTYPE_NAMES.values())
    entries: dict[tuple[str, int, int, str], dict[int, str]] = {}
    for i, e in enumerate(raw_entries):
        if not isinstance(e, dict):
            raise ValueError(f"bad entry {i}: {e!r} is not an object")
        sizes = {"width": e.get("width"), "hidden": e.get("hidden", e.get("width")), "rows": e.get("rows")}
        problem = (f"dtype {e.get('dtype')!r}" if e.get("dtype") not in dtypes
                   else f"winner {e.get('winner')!r}" if e.get("winner") not in CANDIDATES
                   else f"mode {e.get('mode')!r}" if e.get("mode") not in MODES
                   else next((f"{k} {v!r}, not a positive integer" for k, v in sizes.items()
                              if not _positive_int(v)), None))
        if problem is not None:
            raise ValueError(f"bad entry {i} ({problem}): {e!r}")
        key = (e["dtype"], padded(sizes["width"]), padded(sizes["hidden"]), e["mode"])
        entries.setdefault(key, {})[bucket(e["rows"])] = e["winner"]
    return Table(device, (cap[0], cap[1]), source, entries)


def _read(path: Path) -> Table:
    """The table in ``path``; ValueError (or OSError) saying why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    return _parse(data, str(path))


# (tables, skipped) once read; built whole and published with one assignment, under a lock so that threads
# asking at once read (and warn about) each file once.
_loaded: tuple[tuple[Table, ...], tuple[tuple[Path, str], ...]] | None = None
_loading = threading.Lock()


def tables() -> tuple[Table, ...]:
    """Every readable table, highest precedence first (see the module docstring). A table found by scanning that
    cannot be read is skipped with a warning (``skipped_tables()``); the one named by ``FUSED_RESIDUAL_DISPATCH_TABLE``
    must be readable (ValueError otherwise)."""
    return (_loaded or _load())[0]


def skipped_tables() -> tuple[tuple[Path, str], ...]:
    """The tables found by scanning that could not be read, with why."""
    return (_loaded or _load())[1]


def _load() -> tuple[tuple[Table, ...], tuple[tuple[Path, str], ...]]:
    global _loaded
    with _loading:
        if _loaded is None:
            _loaded = _scan()
        return _loaded


def _scan() -> tuple[tuple[Table, ...], tuple[tuple[Path, str], ...]]:
    found: list[Table] = []
    skipped: list[tuple[Path, str]] = []
    named = os.environ.get(TABLE_ENV_VAR)
    if named:
        try:
            found.append(_read(Path(named)))
        except (OSError, ValueError) as e:
            raise ValueError(f"{TABLE_ENV_VAR}={named}: cannot read this dispatch table: {e}") from None
    for folder in (user_cache_dir(), SHIPPED):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("dispatch-*.json")):
            try:
                found.append(_read(path))
            except (OSError, ValueError) as e:
                skipped.append((path, str(e)))
                warnings.warn(f"fused_residual: skipped the dispatch table {path}: {e}", stacklevel=2)
    return tuple(found), tuple(skipped)


def device_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) a table is matched by: the GPU's, or ("cpu", (0, 0)) for any CPU."""
    if is_gpu(device):
        return torch.cuda.get_device_name(device), tuple(capability(device))
    return device.type, (0, 0)


@functools.cache
def _device_tables(device: torch.device) -> tuple[Table, ...]:
    name, cap = device_identity(device)
    same_name = [t for t in tables() if t.device == name]
    same_arch = [t for t in tables() if t.device != name and is_gpu(device) and tuple(t.capability) == cap]
    return tuple(same_name + same_arch)


def lookup(found: tuple[Table, ...], dtype: torch.dtype, width: int, hidden: int, rows: int, mode: str) -> str | None:
    """The winner of the nearest measured row bucket in the first table that has this (dtype, widths, mode)."""
    key = (DTYPE_NAMES.get(dtype, str(dtype)), padded(width), padded(hidden), mode)
    target = bucket(rows).bit_length()
    for table in found:
        measured = table.entries.get(key)
        if measured:
            nearest = min(measured, key=lambda b: (abs(b.bit_length() - target), b))
            return measured[nearest]
    return None


# The first GPU measurement's wall-time wins of the Triton kernels (H200, torch 2.11, triton 3.6, 2026-11-26,
# ../shared/measurements): the whole-block forward at width 128 and 65536 rows, bf16 1.56x and fp16 1.39x. It
# lost at widths 32 and 64 (host cost per launch), every two-GEMM shape and every training step.
MEASURED_WINS = {("forward", torch.bfloat16, 128), ("forward", torch.float16, 128)}
MEASURED_ROWS = 1 << 16
# CPU (``python -m fused_residual.tune --device cpu``, two runs on a 2-core EPYC, benchmarks/results/cpu-*-tune):
# below this row bucket the block's Function costs more than it saves (training 16 x 16: 0.85x the reference's
# wall time, the composite 0.95x; forward the composite 1.1-1.2x); from it on the torch backend's fewer passes
# over memory win (training 65536 x 32: 1.19x, 4096 x 256: 1.13x).
CPU_FUNCTION_ROWS = 1 << 12


def conservative(gpu: bool, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
                 training: bool) -> str:
    """The rule where no table has an entry. GPU: the measured Triton wins above, else the cuBLAS composite
    (the torch backend without autograd; in training the reference's own ops under PyTorch's autograd). CPU:
    the torch backend from ``CPU_FUNCTION_ROWS`` rows on, the composite below."""
    mode = "train" if training else "forward"
    if not gpu:
        return "torch" if bucket(rows) >= CPU_FUNCTION_ROWS else "composite"
    if (not projection and width == hidden and (mode, dtype, padded(width)) in MEASURED_WINS
            and rows >= MEASURED_ROWS):
        return "triton:whole_block"
    return "composite" if training else "torch"


def winner(device: torch.device, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
           training: bool) -> str:
    """The implementation for a seed-form block call on ``device``: a table's winner, else the rule."""
    if not projection:
        found = lookup(_device_tables(device), dtype, width, hidden, rows, "train" if training else "forward")
        if found is not None:
            return found
    return conservative(is_gpu(device), dtype, width, hidden, rows, projection, training)


# ---- routes ---------------------------------------------------------------------------------------------------

ENV_VAR = "FUSED_RESIDUAL_BACKEND"
AUTO = "auto"
COMPOSITE_CHOICE = "composite"


class Route(NamedTuple):
    """Who computes a call: a backend and the kernel variant asked of it, or (``backend`` None) the plain composite,
    or (``op``) the custom ops that ``ops.py`` registers for ``torch.compile``."""

    backend: Backend | None
    variant: str | None = None
    op: bool = False

    @property
    def name(self) -> str:
        if self.backend is None:
            return "registered op" if self.op else "composite"
        return self.backend.NAME if self.variant is None else f"{self.backend.NAME}:{self.variant}"


COMPOSITE = Route(None)
REGISTERED_OP = Route(None, op=True)

_parsed: tuple[str | None, str] = (None, AUTO)  # (raw value, choice): parse only when the variable changes
_routes: dict[tuple, Route] = {}
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
    if form != SEED_FORM or projection or not is_gpu(device) or backends.missing_requirement("triton") is not None:
        return False
    mode = "train" if training else "forward"
    key = (DTYPE_NAMES.get(dtype, str(dtype)), padded(width), padded(hidden), mode)
    if any(w.startswith("triton") for table in _device_tables(device) for w in table.entries.get(key, {}).values()):
        return True
    return width == hidden and (mode, dtype, padded(width)) in MEASURED_WINS


def backend_route(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool) -> Route:
    """The backend (or the composite) for a block call; decisions are cached per call signature (what varies per
    call is only the batch size, bucketed)."""
    choice = requested()
    width = x.shape[-1]
    rows_ = x.numel() // width if width else 0
    key = (choice, x.device, x.dtype, w1.dtype, (rows_ - 1).bit_length(), width, w1.shape[0], ws is None, form,
           training)  # (rows - 1).bit_length(): the row bucket's exponent (bucket)
    chosen = _routes.get(key)
    if chosen is None:
        if choice == AUTO:
            chosen = _auto(x, w1, ws, form, training, rows_)
        elif choice == COMPOSITE_CHOICE:
            chosen = COMPOSITE
        else:
            chosen = forced(choice, x.device, w1.dtype, form)
        _routes[key] = chosen
    return chosen


def _auto(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, training: bool, rows_: int) -> Route:
    """``auto``: the dispatch tables' winner for a seed-form call (``winner``), among the candidates that can run
    it; the conservative rule for other forms and where the Triton kernels cannot run."""
    dtype, device = w1.dtype, x.device
    gpu = is_gpu(device)
    triton_backend = None
    if gpu and backends.missing_requirement("triton") is None:
        triton_backend = backends.get("triton")
        if triton_backend.unavailable(device, dtype, form) is not None:
            triton_backend = None
    if form == SEED_FORM:
        found = winner(device, dtype, x.shape[-1], w1.shape[0], rows_, ws is not None, training)
    else:  # no form but the seed's was measured: the rule's non-Triton choice (projection=True never takes Triton)
        found = conservative(gpu, dtype, x.shape[-1], w1.shape[0], rows_, True, training)
    if found.startswith("triton"):
        if triton_backend is not None:
            return Route(triton_backend, found.partition(":")[2] or None)
        found = conservative(True, dtype, 0, 0, 0, True, training)
    return COMPOSITE if found == "composite" else Route(backends.get("torch"))


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


def backward_builds_graph() -> bool:
    """Whether the running backward builds a graph (``create_graph=True``: double backward, gradient penalties):
    then it differentiates through the plain composite (``composite.block_grads``), not the kernels."""
    return torch.is_grad_enabled()


def on_reset(callback) -> None:
    """Call ``callback()`` whenever ``reset`` runs (the plans built on cached decisions subscribe)."""
    _on_reset.append(callback)


def reset() -> None:
    """Forget cached decisions and tables (after a dispatch table or backend registration changes)."""
    global _parsed, _loaded
    _loaded = None
    _device_tables.cache_clear()
    _routes.clear()
    _parsed = (None, AUTO)
    for callback in _on_reset:
        callback()
