"""Dispatch tables: the JSON files ``python -m fused_residual.tune`` writes on a device, where they are read from,
and reading them (``fused_residual.dispatch`` matches them to a device and decides with them).

A table holds the device, its family (``kernels/_common.py``'s ``family``; older tables have none and match by
device name only) and compute capability, the torch/triton versions, the date and commit they were measured at,
and one entry per measured (dtype, padded width, padded hidden width, row bucket, mode) with every candidate's wall
time per call and the winner. Tables are read from, in this order: the file named by
``FUSED_RESIDUAL_DISPATCH_TABLE``, the user's tuned tables (``~/.cache/fused_residual/`` or
``$FUSED_RESIDUAL_CACHE``), and the tables shipped in ``fused_residual/dispatch_tables/``. A table found in those
folders that cannot be read (not JSON, not this format, a bad entry) is skipped with a warning naming the file and
why; the file named by ``FUSED_RESIDUAL_DISPATCH_TABLE`` must be readable: otherwise every ``auto`` call raises a
ValueError naming the file, the variable and why.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .kernels._common import FAMILIES

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
    family: str | None = None
    """The device family it was measured on (``kernels/_common.py``), if the table names one."""


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
    fam = data.get("family")
    if fam is not None and fam not in FAMILIES:
        raise ValueError(f"family {fam!r} is not one of {', '.join(FAMILIES)}")
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
    return Table(device, (cap[0], cap[1]), source, entries, fam)


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


def forget() -> None:
    """Read the tables again at the next ``tables()`` (after one changed)."""
    global _loaded
    _loaded = None
