"""Reading benchmark results into per-device sections: pytest-benchmark JSON, the suite's JSON lines
(``records.py``) and the first GPU run's ``blocks.json``.

A ``Section`` holds every result of one device (a CPU model or a GPU model): CPU and GPU results are never mixed.
Its ``Row``s are one (kind, shape, dtype, mode) each, with a ``Record`` per implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import records
from .cases import Case, work

DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}
MODE_ORDER = {"forward": 0, "train": 1, "train-sum": 2}
KIND_TITLES = {"block": "Residual block", "ffn": "Transformer FFN, x + linear2(gelu(linear1(x))), hidden 4 x width",
               "net": "Whole net (blocks x rows x width)"}


@dataclass
class Record:
    """One benchmark of one implementation."""

    device: str  # "cpu" | "cuda"
    device_name: str
    dtype: str
    mode: str
    kind: str  # "block" | "net" | "ffn"
    rows: int
    width: int
    blocks: int
    impl: str
    pytest_s: float | None  # the chosen pytest-benchmark statistic (default: median), seconds
    do_bench_ms: float | None
    extra: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # pytest-benchmark's statistics (q1, q3, rounds, ...), seconds

    @property
    def row_key(self) -> tuple:
        return (self.kind, self.blocks, DTYPE_ORDER.get(self.dtype, 9), self.dtype, MODE_ORDER.get(self.mode, 9),
                self.mode, self.width, self.rows)


@dataclass
class Row:
    """Every implementation of one (kind, shape, dtype, mode) on one device."""

    kind: str
    blocks: int
    rows: int
    width: int
    dtype: str
    mode: str
    records: dict[str, Record] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return f"{self.blocks} x {self.rows} x {self.width}" if self.blocks else f"{self.rows} x {self.width}"


@dataclass
class Section:
    """All results of one device and where they came from."""

    device: str
    device_name: str
    stat: str = "median"  # the pytest-benchmark statistic used as host-clock time
    rows: dict[tuple, Row] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # per run (a JSON file or a JSONL session): environment
    unmeasured: list[dict] = field(default_factory=list)  # JSONL cases that failed or were skipped
    cold_start: list[dict] = field(default_factory=list)  # benchmarks/cold_start.py records
    notes: list[str] = field(default_factory=list)  # what a reader must know about where the numbers came from

    @property
    def title(self) -> str:
        return f"{self.device}: {self.device_name}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.device} {self.device_name}".lower()).strip("-")

    def ordered_rows(self, kind: str | None = None) -> list[Row]:
        return [self.rows[k] for k in sorted(self.rows) if kind is None or self.rows[k].kind == kind]


def _record(bench: dict, stat: str = "median") -> Record | None:
    info = bench.get("extra_info") or {}
    if "impl" not in info:
        return None  # not one of ours
    stats = bench.get("stats") or {}
    return Record(
        device=info["device"], device_name=info.get("device_name") or info["device"], dtype=info["dtype"],
        mode=info["mode"], kind=info.get("kind", "block"), rows=int(info["rows"]), width=int(info["width"]),
        blocks=int(info.get("blocks") or 0), impl=info["impl"], pytest_s=stats.get(stat),
        do_bench_ms=info.get("do_bench_ms"), extra=info, stats=stats,
    )


def _source(path: Path, machine: dict, **more: Any) -> dict:
    return {
        "file": path.name,
        "date": machine.get("date"),
        "commit": machine.get("commit"),
        "dirty": machine.get("dirty"),
        "torch": machine.get("torch"),
        "triton": machine.get("triton"),
        "shape_set": machine.get("shape_set"),
        "torch_threads": machine.get("torch_threads"),
        "ceilings": (machine.get("ceilings") or {}).get("cuda"),
        "planned": None,  # JSONL: the case ids the run meant to measure
        "finished": set(),  # JSONL: the case ids it wrote a line for
        "unreadable_lines": 0,
        **more,
    }


def read_runs(path: Path) -> tuple[list[tuple[dict, list[dict]]], list[dict]]:
    """``([(source, benchmark entries), ...], cold-start records)`` of one file: pytest-benchmark JSON (one run)
    or JSON lines (a run per ``session`` line; a line cut short by a kill is counted and skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "benchmarks" in data:  # pytest-benchmark JSON
        (session, *entries) = records.compact(data)
        machine = {**session["fused_residual"], "shape_set": session["shape_set"]}
        return [(_source(path, machine), entries)], []
    lines, unreadable = records.read(path)
    runs: list[tuple[dict, list[dict]]] = []
    cold: list[dict] = []
    for line in lines:
        kind = line.get("type")
        if kind == "session":
            machine = {**(line.get("fused_residual") or {}), "shape_set": line.get("shape_set")}
            planned = line.get("planned")
            runs.append((_source(path, machine, planned=None if planned is None else list(planned)), []))
        elif kind == "benchmark":
            if not runs:
                runs.append((_source(path, {}), []))
            runs[-1][1].append(line)
        elif kind == "cold_start":
            cold.append(line)
    if runs:
        runs[0][0]["unreadable_lines"] = unreadable
    return runs, cold


# ------------------------------------------------------------------------------------- the first GPU run

# blocks.json's time keys -> (implementation, mode); its torch.compile times (mode "max-autotune-no-cudagraphs",
# at two shapes only) have no implementation of the same meaning here and are left out.
BLOCKS_JSON_TIMES = {"eager_fwd": ("eager", "forward"), "fused_fwd": ("fused", "forward"),
                     "eager_train": ("eager", "train"), "fused_train": ("fused", "train"),
                     "gemm_fwd": ("bare-gemm", "forward")}


def is_blocks_json(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("cases"), list) and "device" in data


def read_blocks_json(path: Path, data: dict) -> Section:
    """The first GPU run's ``blocks.json`` as a section: do_bench medians of the whole call, no spread and no
    round counts (that run did not record them). Date and commit come from the folder's name
    (``<device>-<date>-<commit>``)."""
    name = data["device"]
    section = Section("cuda", name)
    found = re.search(r"(\d{4}-\d{2}-\d{2})-([0-9a-f]{7,40})$", Path(path).resolve().parent.name)
    ceilings = data.get("ceilings") or {}
    limits = {"copy_GBps": ceilings["copy_TBps"] * 1e3} if "copy_TBps" in ceilings else {}
    if "bf16_mm_TFLOPs" in ceilings:
        limits["matmul_TFLOPs"] = {"bf16": ceilings["bf16_mm_TFLOPs"]}
    section.sources.append(_source(Path(path), {"date": found and found.group(1), "commit": found and found.group(2),
                                                "torch": data.get("torch"), "triton": data.get("triton"),
                                                "shape_set": "the first GPU run's 8 block shapes"},
                                   ceilings=limits or None))
    section.notes.append("Times: `triton.testing.do_bench` medians of the whole call (wall time), as `blocks.json` "
                         "holds them; that run recorded no spread and no round counts, so its points have no bars.")
    for case in data["cases"]:
        rows, width = case["shape"]
        for key, (impl, mode) in BLOCKS_JSON_TIMES.items():
            if key not in case.get("ms", {}):
                continue
            flops, nbytes = work(Case("cuda", case["dtype"], mode, rows, width, impl))
            info = {"impl": impl, "device": "cuda", "device_name": name, "dtype": case["dtype"], "mode": mode,
                    "kind": case.get("kind", "block"), "rows": rows, "width": width, "blocks": 0, "flops": flops,
                    "bytes": nbytes}
            record = Record("cuda", name, case["dtype"], mode, info["kind"], rows, width, 0, impl, None,
                            case["ms"][key], info)
            row = section.rows.setdefault(record.row_key, Row(record.kind, 0, rows, width, record.dtype, mode))
            row.records[impl] = record
    return section


# ------------------------------------------------------------------------------------------------ loading


def load(paths: Iterable[Path], stat: str = "median") -> list[Section]:
    """Results grouped by device; ``stat``: which pytest-benchmark statistic is the host-clock time."""
    sections: dict[tuple[str, str], Section] = {}

    def section_of(device: str, device_name: str) -> Section:
        return sections.setdefault((device, device_name), Section(device, device_name, stat=stat))

    for path in paths:
        path = Path(path)
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                data = None
            if is_blocks_json(data):
                found = read_blocks_json(path, data)
                section = section_of(found.device, found.device_name)
                section.rows.update(found.rows)
                section.sources += found.sources
                section.notes += found.notes
                continue
        runs, cold = read_runs(path)
        for source, entries in runs:
            for bench in entries:
                if "id" in bench:
                    source["finished"].add(bench["id"])
                record = _record(bench, stat)
                outcome = bench.get("outcome", "passed")
                if record is None or outcome != "passed":
                    if outcome != "passed":
                        info = bench.get("extra_info") or {}
                        device = info.get("device") or str(bench.get("id", "?")).split("-")[0]
                        section = section_of(device, info.get("device_name") or device)
                        section.unmeasured.append({"id": bench.get("id"), "outcome": outcome,
                                                   "message": bench.get("message")})
                        if source not in section.sources:
                            section.sources.append(source)
                    continue
                section = section_of(record.device, record.device_name)
                if source not in section.sources:
                    section.sources.append(source)
                row = section.rows.setdefault(record.row_key, Row(record.kind, record.blocks, record.rows,
                                                                  record.width, record.dtype, record.mode))
                row.records[record.impl] = record  # a later file wins
        for record in cold:
            device = record.get("device", "?")
            section_of(device, record.get("device_name") or device).cold_start.append(record)
    return [sections[k] for k in sorted(sections)]
