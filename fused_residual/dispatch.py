"""Which implementation computes a block: measured winners first, a conservative rule elsewhere.

Candidates (``CANDIDATES``): ``triton:whole_block`` (the whole block per row tile, ``h`` on chip), ``triton:two_gemm``
(two fused-epilogue GEMM kernels), ``torch`` (the cuBLAS composite under the block's autograd Function) and
``composite`` (the reference's own ops under PyTorch's autograd).

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

import torch

from .kernels._common import capability

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


def reset() -> None:
    global _loaded
    _loaded = None
    _device_tables.cache_clear()


def device_identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) a table is matched by: the CUDA device's, or ("cpu", (0, 0)) for any CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device), tuple(capability(device))
    return device.type, (0, 0)


@functools.cache
def _device_tables(device: torch.device) -> tuple[Table, ...]:
    name, cap = device_identity(device)
    same_name = [t for t in tables() if t.device == name]
    same_arch = [t for t in tables() if t.device != name and device.type == "cuda" and tuple(t.capability) == cap]
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
# benchmarks/results/h200-2026-11-26-44834e3): whole-block forward, width 128, 65536 rows: bf16 1.56x, fp16 1.39x. It
# lost at widths 32 and 64 (host cost per launch), every two-GEMM shape and every training step.
MEASURED_WINS = {("forward", torch.bfloat16, 128), ("forward", torch.float16, 128)}
MEASURED_ROWS = 1 << 16
# CPU (``python -m fused_residual.tune --device cpu``, two runs on a 2-core EPYC, results/cpu-2026-11-26-76e4445/tune):
# below this row bucket the block's Function costs more than it saves (training 16 x 16: 0.85x the reference's
# wall time, the composite 0.95x; forward the composite 1.1-1.2x); from it on the torch backend's fewer passes
# over memory win (training 65536 x 32: 1.19x, 4096 x 256: 1.13x).
CPU_FUNCTION_ROWS = 1 << 12


def conservative(device_type: str, dtype: torch.dtype, width: int, hidden: int, rows: int, projection: bool,
                 training: bool) -> str:
    """The rule where no table has an entry. CUDA: the measured Triton wins above, else the cuBLAS composite
    (the torch backend without autograd; in training the reference's own ops under PyTorch's autograd). CPU:
    the torch backend from ``CPU_FUNCTION_ROWS`` rows on, the composite below."""
    mode = "train" if training else "forward"
    if device_type != "cuda":
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
    return conservative(device.type, dtype, width, hidden, rows, projection, training)
