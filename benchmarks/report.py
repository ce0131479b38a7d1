"""``python -m benchmarks.report RESULTS [...] [-o OUTDIR]``: benchmark results -> markdown + plots.

RESULTS: pytest-benchmark JSON (``--benchmark-json``) or the suite's JSON lines (``--bench-jsonl``, and
``python -m benchmarks.cold_start --out``; see ``records.py``), in any mix. JSON lines are read as far as they
go: a run stopped at its time limit is reported with what it finished, and how much of its plan that was.

Writes ``OUTDIR/report.md`` (default OUTDIR: the first file's folder) and one PNG per (device, dtype, mode):
the fused block's speed-up over the eager reference (the paired ratio where recorded) against width, one line
per row count (dashed: over torch.compile; dotted: GPU time). Prints a short summary, on CUDA a compact table of
both clocks last. Each device gets its own section and plots: CPU and GPU results are never mixed.

Per (shape, dtype, mode) the table gives median times (ms) and the ratios eager/fused, compile/fused,
max-autotune/fused, addmm-act/fused (> 1: fused is faster) and fused/bare-gemm (the fused block's cost over
its GEMMs alone; 1 is the floor). CPU runs add "eager/fused paired": the two timed in alternation, the median
of the per-pair ratios (steadier when other processes share the cores). On CUDA also the fused block's
achieved bandwidth and FLOP rate, as a fraction of the ceilings measured in the same run (a 1 GiB
device-to-device copy, 8192^3 matrix products).

Both clocks on CUDA (wall time = host time + the GPU time the host could not hide): per implementation pair
(eager vs fused, and both under ``torch.compile(mode="reduce-overhead")``) the wall time (do_bench of the whole
call), the host time (perf_counter around calls without synchronizing) and the GPU time (kernel times summed by
torch.profiler), each with its ratio, and the kernels per call. Then issue 9's targets judged on them, and the
cold start (first forward + backward at a new width, empty and warm Triton cache).

Timer: ``auto`` (default) takes the do_bench medians (CUDA events, L2 flushed) for a device whose results all
have them, else the pytest-benchmark medians (host clock around step + synchronize); or choose one.
``--stat min`` uses the pytest-benchmark minimum instead of the median (steadier on a shared machine).
Reads only extra_info written by ``benchmarks/harness.py``: impl, device, device_name, dtype, mode, kind,
rows, width, blocks, flops, bytes, peak_bytes, saved_bytes, do_bench_ms, host_ms, gpu_ms, kernels_per_call,
graph_breaks, cudagraph_skips, ceilings.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import records
from .cases import CUDA_MEASURED_SHAPES, FUSED, IMPLS, REFERENCE, RO_FUSED, RO_REFERENCE, RO_TARGET_MAX_WIDTH

RO = "ro ref/fused"  # both under torch.compile(mode="reduce-overhead")
# (column, numerator impl, denominator impl): time ratios.
RATIOS = (
    ("eager/fused", REFERENCE, FUSED),
    ("compile/fused", "compile", FUSED),
    ("max-autotune/fused", "max-autotune", FUSED),
    (RO, RO_REFERENCE, RO_FUSED),
    ("addmm-act/fused", "addmm-act", FUSED),
    ("fused/bare-gemm", FUSED, "bare-gemm"),
)
PAIRED = "eager/fused paired"  # median of per-pair ratios, eager and fused timed in alternation
TIMERS = ("auto", "pytest", "do_bench")  # the speed table's; "host" and "gpu" are the other clocks
# The clocks of the both-clocks tables: (name, timer, what it is).
CLOCKS = (("wall", "do_bench", "do_bench median of the whole call"),
          ("host", "host", "perf_counter around calls without synchronizing"),
          ("GPU", "gpu", "kernel times summed by torch.profiler"))
# Implementation pairs the both-clocks tables compare: (title, reference side, fused side, their column labels).
CLOCK_PAIRS = (("eager vs fused", REFERENCE, FUSED, ("eager", "fused")),
               ('both under torch.compile(mode="reduce-overhead")', RO_REFERENCE, RO_FUSED, ("ro ref", "ro fused")))
DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}
MODE_ORDER = {"forward": 0, "train": 1, "train-sum": 2}


@dataclass
class Record:
    """One benchmark of one implementation."""

    device: str  # "cpu" | "cuda"
    device_name: str
    dtype: str
    mode: str
    kind: str  # "block" | "net"
    rows: int
    width: int
    blocks: int
    impl: str
    pytest_s: float | None  # the chosen pytest-benchmark statistic (default: median), seconds
    do_bench_ms: float | None
    extra: dict = field(default_factory=dict)

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
    """All results of one device (a CPU model or a GPU model) and where they came from."""

    device: str
    device_name: str
    stat: str = "median"  # the pytest-benchmark statistic used as host-clock time
    rows: dict[tuple, Row] = field(default_factory=dict)
    sources: list[dict] = field(default_factory=list)  # per run (a JSON file or a JSONL session): environment
    unmeasured: list[dict] = field(default_factory=list)  # JSONL cases that failed or were skipped
    cold_start: list[dict] = field(default_factory=list)  # benchmarks/cold_start.py records

    @property
    def title(self) -> str:
        return f"{self.device}: {self.device_name}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.device} {self.device_name}".lower()).strip("-")


# ------------------------------------------------------------------------------------------------ reading


def _record(bench: dict, stat: str = "median") -> Record | None:
    info = bench.get("extra_info") or {}
    if "impl" not in info:
        return None  # not one of ours
    stats = bench.get("stats") or {}
    return Record(
        device=info["device"], device_name=info.get("device_name") or info["device"], dtype=info["dtype"],
        mode=info["mode"], kind=info.get("kind", "block"), rows=int(info["rows"]), width=int(info["width"]),
        blocks=int(info.get("blocks") or 0), impl=info["impl"], pytest_s=stats.get(stat),
        do_bench_ms=info.get("do_bench_ms"), extra=info,
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
        machine = dict((data.get("machine_info") or {}).get("fused_residual") or {})
        commit = data.get("commit_info") or {}
        machine["date"] = machine.get("date") or data.get("datetime")
        machine["commit"] = machine.get("commit") or commit.get("id")
        machine.setdefault("dirty", commit.get("dirty"))
        return [(_source(path, machine), list(data.get("benchmarks") or []))], []
    lines, unreadable = records.read(path)
    runs: list[tuple[dict, list[dict]]] = []
    cold: list[dict] = []
    for line in lines:
        kind = line.get("type")
        if kind == "session":
            machine = {**(line.get("fused_residual") or {}), "shape_set": line.get("shape_set")}
            runs.append((_source(path, machine, planned=list(line.get("planned") or [])), []))
        elif kind == "benchmark":
            if not runs:
                runs.append((_source(path, {}), []))
            runs[-1][1].append(line)
        elif kind == "cold_start":
            cold.append(line)
    if runs:
        runs[0][0]["unreadable_lines"] = unreadable
    return runs, cold


def load(paths: Iterable[Path], stat: str = "median") -> list[Section]:
    """Results grouped by device; ``stat``: which pytest-benchmark statistic is the host-clock time."""
    sections: dict[tuple[str, str], Section] = {}

    def section_of(device: str, device_name: str) -> Section:
        return sections.setdefault((device, device_name), Section(device, device_name, stat=stat))

    for path in paths:
        runs, cold = read_runs(Path(path))
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
                key = record.row_key
                row = section.rows.setdefault(key, Row(record.kind, record.blocks, record.rows, record.width,
                                                       record.dtype, record.mode))
                row.records[record.impl] = record  # a later file wins
        for record in cold:
            device = record.get("device", "?")
            section_of(device, record.get("device_name") or device).cold_start.append(record)
    return [sections[k] for k in sorted(sections)]


# ----------------------------------------------------------------------------------------------- numbers


def section_timer(section: Section, timer: str) -> str:
    """``pytest`` or ``do_bench``: ``auto`` picks do_bench when every result of the section has it."""
    if timer != "auto":
        return timer
    records = [r for row in section.rows.values() for r in row.records.values()]
    return "do_bench" if records and all(r.do_bench_ms is not None for r in records) else "pytest"


def seconds(record: Record | None, timer: str) -> float | None:
    """Seconds per call of ``record`` by ``timer``: ``pytest`` (the pytest-benchmark statistic), ``do_bench``
    (wall, CUDA), ``host`` or ``gpu`` (the other two clocks, CUDA)."""
    if record is None:
        return None
    if timer == "pytest":
        return record.pytest_s
    ms = record.do_bench_ms if timer == "do_bench" else record.extra.get(f"{timer}_ms")
    return None if ms is None else ms * 1e-3


def ratio(row: Row, numerator: str, denominator: str, timer: str) -> float | None:
    a, b = seconds(row.records.get(numerator), timer), seconds(row.records.get(denominator), timer)
    return a / b if a is not None and b else None


def ratios(row: Row, timer: str) -> dict[str, float | None]:
    """Each RATIOS column: time(numerator) / time(denominator), None where one is missing; and PAIRED, the
    eager/fused ratio timed in alternation (CPU runs record it)."""
    out: dict[str, float | None] = {name: ratio(row, num, den, timer) for name, num, den in RATIOS}
    fused = row.records.get(FUSED)
    out[PAIRED] = None if fused is None else fused.extra.get("paired_eager_over_impl")
    return out


def ceilings(section: Section, row: Row) -> dict | None:
    for record in row.records.values():
        if record.extra.get("ceilings"):
            return record.extra["ceilings"]
    return next((s["ceilings"] for s in section.sources if s.get("ceilings")), None)


def achieved(section: Section, row: Row, timer: str, impl: str = FUSED) -> dict[str, float | None]:
    """Bandwidth (GB/s) and FLOP rate (TFLOP/s) of ``impl``, with fractions of the measured ceilings."""
    record = row.records.get(impl)
    t = seconds(record, timer)
    result: dict[str, float | None] = {"GBps": None, "GBps_frac": None, "TFLOPs": None, "TFLOPs_frac": None}
    if record is None or not t:
        return result
    limits = ceilings(section, row) or {}
    if record.extra.get("bytes"):
        result["GBps"] = record.extra["bytes"] / t / 1e9
        if limits.get("copy_GBps"):
            result["GBps_frac"] = result["GBps"] / limits["copy_GBps"]
    if record.extra.get("flops"):
        result["TFLOPs"] = record.extra["flops"] / t / 1e12
        peak = (limits.get("matmul_TFLOPs") or {}).get(row.dtype)
        if peak:
            result["TFLOPs_frac"] = result["TFLOPs"] / peak
    return result


def geomean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(section: Section, timer: str) -> list[dict]:
    """Per (kind, dtype, mode): geomean and min of eager/fused, geomeans of compile/fused and fused/bare."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for key in sorted(section.rows):
        row = section.rows[key]
        groups[(row.kind, row.dtype, row.mode)].append(row)
    lines = []
    for (kind, dtype, mode), rows in groups.items():
        per_row = [ratios(r, timer) for r in rows]
        speedups = [r["eager/fused"] for r in per_row if r["eager/fused"] is not None]
        paired = [r[PAIRED] for r in per_row if r[PAIRED] is not None]
        lines.append({
            "kind": kind, "dtype": dtype, "mode": mode, "shapes": len(speedups),
            "geomean eager/fused": geomean(speedups),
            "min eager/fused": min(speedups) if speedups else None,
            f"geomean {PAIRED}": geomean(paired),
            f"min {PAIRED}": min(paired) if paired else None,
            "geomean host eager/fused": geomean(ratio(r, REFERENCE, FUSED, "host") for r in rows),
            "geomean GPU eager/fused": geomean(ratio(r, REFERENCE, FUSED, "gpu") for r in rows),
            "geomean compile/fused": geomean(r["compile/fused"] for r in per_row),
            f"geomean {RO}": geomean(r[RO] for r in per_row),
            "geomean fused/bare-gemm": geomean(r["fused/bare-gemm"] for r in per_row),
        })
    return lines


# ----------------------------------------------------------------------------------------------- markdown


def _ms(t: float | None) -> str:
    return "—" if t is None else f"{t * 1e3:.3f}" if t < 1 else f"{t * 1e3:.1f}"


def _us(t: float | None) -> str:
    if t is None:
        return "—"
    us = t * 1e6
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def _count(n: float | None) -> str:
    return "—" if n is None else f"{n:g}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(cells) + " |" for cells in body]]


def _present(rows: list[Row], names: Iterable[str]) -> list[str]:
    return [n for n in names if any(n in r.records for r in rows)]


def _speed_table(section: Section, rows: list[Row], timer: str) -> list[str]:
    impls = _present(rows, IMPLS)
    ratio_cols = [name for name, num, den in RATIOS if num in impls and den in impls]
    if any(ratios(r, timer)[PAIRED] is not None for r in rows):
        ratio_cols.insert(1, PAIRED)
    cuda = section.device == "cuda"
    header = ["shape", "dtype", "mode", *[f"{i} ms" for i in impls], *ratio_cols]
    if cuda:
        header += ["fused GB/s (of copy)", "fused TFLOP/s (of matmul)"]
    body = []
    for row in rows:
        r = ratios(row, timer)
        cells = [row.shape, row.dtype, row.mode, *[_ms(seconds(row.records.get(i), timer)) for i in impls],
                 *[_x(r[c]) for c in ratio_cols]]
        if cuda:
            a = achieved(section, row, timer)
            cells.append("—" if a["GBps"] is None else
                         f"{a['GBps']:.0f}" + ("" if a["GBps_frac"] is None else f" ({a['GBps_frac']:.0%})"))
            cells.append("—" if a["TFLOPs"] is None else
                         f"{a['TFLOPs']:.1f}" + ("" if a["TFLOPs_frac"] is None else f" ({a['TFLOPs_frac']:.0%})"))
        body.append(cells)
    return _table(header, body)


def _compile_notes(record: Record | None) -> list[str]:
    if record is None:
        return []
    notes = []
    if record.extra.get("graph_breaks"):
        notes.append(f"{record.impl}: {record.extra['graph_breaks']} graph breaks")
    if record.extra.get("cudagraph_skips"):
        notes.append(f"{record.impl}: Inductor skipped CUDA graphs")
    if record.extra.get("gpu_note"):
        notes.append(f"{record.impl}: {record.extra['gpu_note']}")
    return notes


def _clock_table(section: Section, rows: list[Row], a: str, b: str, labels: tuple[str, str]) -> list[str]:
    """Wall, host and GPU time (us per call) of implementations ``a`` and ``b`` side by side with a/b for each,
    the kernels per call, and ``b``'s achieved bandwidth and FLOP rate on GPU time."""
    rows = [r for r in rows if a in r.records and b in r.records]
    if not rows:
        return []
    la, lb = labels
    header = ["shape", "dtype", "mode"]
    for clock, _, _ in CLOCKS:
        header += [f"{clock} {la} us", f"{clock} {lb} us", f"{clock} {la}/{lb}"]
    header += [f"kernels {la}", f"kernels {lb}", f"{lb} GB/s, TFLOP/s on GPU time"]
    body = []
    notes: list[str] = []
    for row in rows:
        cells = [row.shape, row.dtype, row.mode]
        for _, timer, _ in CLOCKS:
            cells += [_us(seconds(row.records[a], timer)), _us(seconds(row.records[b], timer)),
                      _x(ratio(row, a, b, timer))]
        cells += [_count(row.records[i].extra.get("kernels_per_call")) for i in (a, b)]
        rate = achieved(section, row, "gpu", b)
        cells.append(" / ".join("—" if rate[k] is None else f"{rate[k]:.0f}" if k == "GBps" else f"{rate[k]:.1f}"
                                for k in ("GBps", "TFLOPs")))
        row_notes = _compile_notes(row.records[a]) + _compile_notes(row.records[b])
        if row_notes:
            notes.append(f"- {row.shape} {row.dtype} {row.mode}: " + "; ".join(row_notes))
        body.append(cells)
    return [*_table(header, body), *([""] + notes if notes else [])]


def _clock_tables(section: Section, rows: list[Row]) -> list[str]:
    out = []
    for title, a, b, labels in CLOCK_PAIRS:
        table = _clock_table(section, rows, a, b, labels)
        if table:
            out += [f"Both clocks, {title}:", "", *table, ""]
    return out


def _judge(label: str, values: list[float], at_least: float | None = None, geomean_at_least: float | None = None,
           of: str = "") -> str | None:
    """One target line: met or NOT met on the values present, with the worst and the geomean."""
    if not values:
        return None
    worst, mean = min(values), geomean(values)
    met = (at_least is None or worst >= at_least) and (geomean_at_least is None or mean >= geomean_at_least)
    return (f"- {label}: **{'met' if met else 'NOT met'}** (min {worst:.2f}x, geomean {mean:.2f}x over "
            f"{len(values)} {of or 'cases'})")


def cuda_targets(section: Section) -> list[str]:
    """Issue 9's targets, judged on the block shapes of the first GPU measurement that this run has (wall time
    unless named): ratios eager/fused, > 1 means fused is faster."""
    measured = [r for r in section.rows.values()
                if r.kind == "block" and (r.rows, r.width, r.dtype) in CUDA_MEASURED_SHAPES]
    shapes = len({(r.rows, r.width, r.dtype) for r in measured})
    of = "cases of the measured shapes"

    def values(rows: list[Row], num: str, den: str, timer: str = "do_bench", mode: str | None = None) -> list[float]:
        found = [ratio(r, num, den, timer) for r in rows if mode is None or r.mode == mode]
        return [v for v in found if v is not None]

    ro_rows = [r for r in section.rows.values() if r.kind == "block" and r.width <= RO_TARGET_MAX_WIDTH]
    host_train = [1 / v for v in values(measured, REFERENCE, FUSED, "host", "train")]  # fused/eager
    lines = [
        _judge("fused >= 1.0x eager at every shape, forward and training", values(measured, REFERENCE, FUSED),
               at_least=1.0, of=of),
        _judge("forward geomean >= 1.5x", values(measured, REFERENCE, FUSED, mode="forward"),
               geomean_at_least=1.5, of=of),
        _judge("training step geomean >= 1.3x", values(measured, REFERENCE, FUSED, mode="train"),
               geomean_at_least=1.3, of=of),
        _judge("whole-block widths (<= 128) forward >= 2.5x",
               values([r for r in measured if r.width <= 128], REFERENCE, FUSED, mode="forward"), at_least=2.5,
               of=of),
        _judge(f"both under reduce-overhead, widths <= {RO_TARGET_MAX_WIDTH}: >= 1.2x",
               values(ro_rows, RO_REFERENCE, RO_FUSED), at_least=1.2),
        _judge("host time, forward: fused <= eager (eager/fused >= 1.0x)",
               values(measured, REFERENCE, FUSED, "host", "forward"), at_least=1.0, of=of),
        None if not host_train else
        f"- host time, training step: fused <= 0.8x eager: **{'met' if max(host_train) <= 0.8 else 'NOT met'}** "
        f"(fused/eager at most {max(host_train):.2f}x over {len(host_train)} {of})",
    ]
    lines = [line for line in lines if line]
    if not lines:
        return []
    return [f"Issue 9's targets ({shapes} of the {len(CUDA_MEASURED_SHAPES)} block shapes of the first GPU "
            "measurement present; wall time unless named; a ratio eager/fused above 1 means fused is faster):", "",
            *lines]


def _cold_start_lines(section: Section) -> list[str]:
    from .cold_start import TARGET_S

    if not section.cold_start:
        return []
    body = []
    for r in section.cold_start:
        def s(key: str, digits: int = 2, r: dict = r) -> str:
            return "—" if r.get(key) is None else f"{r[key]:.{digits}f}"

        body.append([f"{r.get('rows')} x {r.get('width')}", str(r.get("dtype")),
                     str(r.get("backend_used") or r.get("backend")), str(r.get("cache")), s("first_step_s"),
                     s("second_step_s", 4), s("process_s", 1), s("import_s"), str(r.get("cache_kernels", "—")),
                     str(r.get("outcome")) + (f": {r['message']}" if r.get("message") else "")])
    firsts = [r["first_step_s"] for r in section.cold_start
              if r.get("cache") == "empty" and r.get("first_step_s") is not None and r.get("outcome") == "passed"]
    verdict = ""
    if firsts and section.device == "cuda":
        met = max(firsts) <= TARGET_S
        where = "" if "H100" in section.device_name else f" (measured on {section.device_name}, not an H100)"
        verdict = (f" Issue 10's target, first forward + backward at a new width with an empty cache <= "
                   f"{TARGET_S:.0f} s on an H100: **{'met' if met else 'NOT met'}** (at most {max(firsts):.2f} s)"
                   f"{where}.")
    header = ["rows x width", "dtype", "backend", "Triton cache", "first fwd+bwd s", "second s", "process s",
              "import s", "kernels in cache", "outcome"]
    return ["### Cold start", "",
            "A fresh process per line; `empty`: a new, empty `TRITON_CACHE_DIR`, `warm`: a second process on the "
            "cache the first filled (compiled kernels from disk, autotuning again: Triton's default), `warm_tuned`: "
            "a third with `TRITON_CACHE_AUTOTUNING=1` (the autotuners' choices from disk too) "
            "(`python -m benchmarks.cold_start`)." + verdict, "", *_table(header, body)]


def _memory_table(section: Section, rows: list[Row]) -> list[str]:
    """Training step: peak CUDA memory, or on CPU the bytes saved for backward (MiB)."""
    key = "peak_bytes" if section.device == "cuda" else "saved_activation_bytes"
    rows = [r for r in rows if r.mode == "train" and any(key in rec.extra for rec in r.records.values())]
    if not rows:
        return []
    impls = [i for i in IMPLS if any(i in r.records and key in r.records[i].extra for r in rows)]
    body = []
    for row in rows:
        values = {i: row.records[i].extra.get(key) if i in row.records else None for i in impls}
        eager, fused = values.get("eager"), values.get("fused")
        body.append([row.shape, row.dtype, *[_bytes(values[i]) for i in impls],
                     _x(fused / eager) if fused is not None and eager else "—"])
    what = ("peak CUDA memory of one training step beyond what was allocated before it" if section.device == "cuda"
            else "activation bytes saved for backward by one training step (saved-tensor hooks, unique "
                 "storages, parameters excluded)")
    return [f"Memory: {what}.", "", *_table(["shape", "dtype", *impls, "fused/eager"], body)]


def _progress(section: Section, source: dict) -> str:
    """How much of a JSONL run's plan for this device finished (a run stopped at its time limit finishes less)."""
    if source.get("planned") is None:
        return ""
    prefix = section.device + "-"
    planned = [i for i in source["planned"] if i.startswith(prefix)]
    finished = {i for i in source["finished"] if i.startswith(prefix)}
    text = f"{len(finished & set(planned))} of {len(planned)} planned cases finished"
    if len(finished & set(planned)) < len(planned):
        text += " (the run stopped before the rest)"
    if source.get("unreadable_lines"):
        text += f"; {source['unreadable_lines']} unreadable line(s) skipped (cut short)"
    return text


def _source_lines(section: Section) -> list[str]:
    lines = []
    for s in section.sources:
        commit = (s["commit"] or "unknown")[:12] + (" (uncommitted changes)" if s.get("dirty") else "")
        threads = f", {s['torch_threads']} torch threads" if s.get("torch_threads") and section.device == "cpu" else ""
        progress = _progress(section, s)
        lines.append(f"- `{s['file']}`: {s['date']}, commit {commit}, torch {s['torch']}, triton {s['triton']}, "
                     f"shape set {s['shape_set']}{threads}" + (f"; {progress}" if progress else ""))
        # JSON lines carry the ceilings in each CUDA case's extra_info, not in the session line.
        c = s.get("ceilings") or next((r.extra["ceilings"] for row in section.rows.values()
                                       for r in row.records.values() if r.extra.get("ceilings")), None)
        if c and section.device == "cuda":
            mm = ", ".join(f"{k} {v:.0f}" for k, v in c.get("matmul_TFLOPs", {}).items())
            lines.append(f"  - ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s (read + write); "
                         f"{c.get('matmul_n', 8192)}^3 matmul TFLOP/s: {mm} (allow_tf32={c.get('allow_tf32')})")
    return lines


def _timer_text(timer: str, stat: str = "median") -> str:
    return ("`triton.testing.do_bench` median (CUDA events, L2 flushed before each call)" if timer == "do_bench"
            else f"pytest-benchmark {stat} over rounds (host clock around one step plus synchronize)")


def render(sections: list[Section], timer: str, plots: dict[str, list[str]]) -> str:
    out = ["# fused_residual benchmarks", "",
           "Made by `python -m benchmarks.report`. Times in ms (us in the both-clocks tables); a ratio a/b above "
           "1 means b is faster. `fused/bare-gemm` is the fused block's time over its GEMMs alone (`torch.mm`, "
           f"no epilogues): 1.00x is the floor. `{RO}`: the reference over the fused module, both under "
           '`torch.compile(mode="reduce-overhead")` (CUDA graphs).', ""]
    for section in sections:
        t = section_timer(section, timer)
        out += [f"## {section.title}", "", *_source_lines(section), "", f"Timer: {_timer_text(t, section.stat)}.", ""]
        if section.device == "cuda" and any("gpu_ms" in r.extra or "host_ms" in r.extra
                                            for row in section.rows.values() for r in row.records.values()):
            out += ["Both clocks: " + "; ".join(f"{name}: {what}" for name, _, what in CLOCKS)
                    + " (us per call). Wall time = host time + the GPU time the host could not hide.", ""]
        loads = [r.extra["loadavg_1m"] for row in section.rows.values() for r in row.records.values()
                 if r.extra.get("loadavg_1m") is not None]
        if loads:
            out += [f"Machine load (1-minute average) when each benchmark started: {min(loads):.2f} to "
                    f"{max(loads):.2f} (other processes share the cores: read ratios with that in mind).", ""]
        ordered = [section.rows[k] for k in sorted(section.rows)]
        for kind, title in (("block", "Residual block"), ("net", "Whole net (blocks x rows x width)"),
                            ("ffn", "Transformer FFN, x + linear2(gelu(linear1(x))), hidden 4 x width")):
            rows = [r for r in ordered if r.kind == kind]
            if rows:
                out += [f"### {title}", "", *_speed_table(section, rows, t), ""]
                if section.device == "cuda":
                    out += _clock_tables(section, rows)
                memory = _memory_table(section, rows)
                if memory:
                    out += [*memory, ""]
        if section.rows:
            out += ["### Summary", "", *_summary_table(summary(section, t)), ""]
        if section.device == "cpu" and section.rows:
            out += [_cpu_target(section, t), ""]
        if section.device == "cuda":
            targets = cuda_targets(section)
            if targets:
                out += ["### Targets", "", *targets, ""]
        cold = _cold_start_lines(section)
        if cold:
            out += [*cold, ""]
        if section.unmeasured:
            out += ["### Not measured", ""]
            out += [f"- `{u['id']}`: {u['outcome']}" + (f": {u['message']}" if u["message"] else "")
                    for u in section.unmeasured]
            out.append("")
        for name in plots.get(section.slug, []):
            out += [f"![{name}]({name})", ""]
    return "\n".join(out).rstrip() + "\n"


def _summary_table(lines: list[dict]) -> list[str]:
    header = ["kind", "dtype", "mode", "shapes", "geomean eager/fused", "min eager/fused",
              f"geomean {PAIRED}", f"min {PAIRED}", "geomean host eager/fused", "geomean GPU eager/fused",
              "geomean compile/fused", f"geomean {RO}", "geomean fused/bare-gemm"]
    header = [h for h in header if any(line[h] is not None for line in lines)]
    return _table(header, [[str(line[h]) if h in ("kind", "dtype", "mode", "shapes") else _x(line[h])
                            for h in header] for line in lines])


def _cpu_target(section: Section, timer: str) -> str:
    """The CPU targets on the block shapes, judged on each of the ratios the run has (separate benchmarks, and
    timed in alternation): issue 9's (forward, training with dout and with y.sum(): eager/fused >= 0.95 on every
    shape, geomean >= 1.05) and issue 2's older one (geomean >= 1.2)."""
    blocks = [ratios(r, timer) for r in section.rows.values() if r.kind == "block"]
    verdicts = []
    for column in ("eager/fused", PAIRED):
        speedups = [r[column] for r in blocks if r[column] is not None]
        if speedups:
            worst, mean = min(speedups), geomean(speedups)
            verdicts.append(f"{column}: issue 9 {'met' if worst >= 0.95 and mean >= 1.05 else 'NOT met'}, issue 2 "
                            f"{'met' if worst >= 0.95 and mean >= 1.2 else 'NOT met'} (min {worst:.2f}x, geomean "
                            f"{mean:.2f}x over {len(speedups)} shape-modes)")
    if not verdicts:
        return ""
    return ("CPU targets (blocks, every mode): eager/fused >= 0.95x on every shape, geomean >= 1.05x (issue 9) or "
            ">= 1.20x (issue 2). " + "; ".join(verdicts) + ".")


# ------------------------------------------------------------------------------------------------- plots


def plot(section: Section, timer: str, out_dir: Path) -> list[str]:
    """One PNG per (dtype, mode): eager/fused (solid; the paired ratio where recorded) and compile/fused
    (dashed) against width, one line per row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_panel: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for key in sorted(section.rows):
        row = section.rows[key]
        if row.kind == "block":
            by_panel[(row.dtype, row.mode)].append(row)
    names = []
    for (dtype, mode), rows in by_panel.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        row_counts = sorted({r.rows for r in rows})
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        plotted = False
        # vs eager: the paired ratio where every point has one (CPU runs), else the separate benchmarks'.
        eager = PAIRED if all(ratios(r, timer)[PAIRED] is not None for r in rows) else "eager/fused"
        lines = ((eager, timer, "-o", "vs eager" + (" (paired)" if eager == PAIRED else "")),
                 ("compile/fused", timer, "--s", "vs compile"),
                 ("eager/fused", "gpu", ":^", "vs eager, GPU time"))
        for i, n in enumerate(row_counts):
            series = sorted((r for r in rows if r.rows == n), key=lambda r: r.width)
            for column, clock, style, label in lines:
                points = [(r.width, ratios(r, clock)[column]) for r in series]
                points = [(w, v) for w, v in points if v is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=colors[i % len(colors)],
                            label=f"{n} rows, {label}")
                    plotted = True
        if not plotted:
            plt.close(fig)
            continue
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        widths = sorted({r.width for r in rows})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("width (in = out features)")
        ax.set_ylabel("speed-up of fused (time ratio)")
        ax.set_title(f"{section.device_name} ({section.device}), {dtype}, {mode}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        name = f"speedup-{section.slug}-{dtype}-{mode}.png"
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------- main


def compact_clocks(section: Section) -> list[str]:
    """Wall, host and GPU time per shape, eager vs fused, in us: the table gpu_check.sh prints last."""
    header = ["shape", "dtype", "mode", "wall e/f us", "wall e/f", "host e/f us", "host e/f", "GPU e/f us", "GPU e/f",
              "kernels e/f", f"wall {RO}"]
    body = []
    for key in sorted(section.rows):
        row = section.rows[key]
        if REFERENCE not in row.records or FUSED not in row.records:
            continue
        eager, fused = row.records[REFERENCE], row.records[FUSED]
        cells = [row.shape, row.dtype, row.mode]
        for _, timer, _ in CLOCKS:
            cells += [f"{_us(seconds(eager, timer))} / {_us(seconds(fused, timer))}",
                      _x(ratio(row, REFERENCE, FUSED, timer))]
        cells += [f"{_count(eager.extra.get('kernels_per_call'))} / {_count(fused.extra.get('kernels_per_call'))}",
                  _x(ratio(row, RO_REFERENCE, RO_FUSED, "do_bench"))]
        body.append(cells)
    return _table(header, body) if body else []


def print_summary(sections: list[Section], timer: str, file: TextIO | None = None) -> None:
    """Per device: the summary table (CPU: and issue 2's target); on CUDA the targets, the cold start and, last,
    the compact table of both clocks."""
    file = file or sys.stdout
    for section in sections:
        t = section_timer(section, timer)
        text = _timer_text(t, section.stat).split(" (")[0]
        print(f"{section.title} ({text})", file=file)
        if section.rows:
            print("\n".join(_summary_table(summary(section, t))), file=file)
        if section.device == "cpu" and section.rows:
            print(_cpu_target(section, t), file=file)
        for source in section.sources:
            if _progress(section, source):
                print(f"{source['file']}: {_progress(section, source)}", file=file)
        if section.unmeasured:
            print(f"not measured: {len(section.unmeasured)} case(s) failed or skipped (report.md lists them)",
                  file=file)
        if section.device == "cuda":
            for line in cuda_targets(section):
                print(line, file=file)
        cold = _cold_start_lines(section)
        if cold:
            print("\n".join(cold[2:]), file=file)
        clocks = compact_clocks(section) if section.device == "cuda" else []
        if clocks:
            print(f"\nBoth clocks, eager / fused (us per call; {'; '.join(f'{n}: {w}' for n, _, w in CLOCKS)}):",
                  file=file)
            print("\n".join(clocks), file=file)
        print(file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path,
                        help="pytest-benchmark JSON (--benchmark-json) or the suite's JSON lines (--bench-jsonl, "
                             "benchmarks.cold_start --out)")
    parser.add_argument("-o", "--out-dir", type=Path, default=None,
                        help="where to write (default: the first file's folder)")
    parser.add_argument("--timer", choices=TIMERS, default="auto", help="which medians to use (default: auto)")
    parser.add_argument("--stat", choices=("median", "min", "mean"), default="median",
                        help="pytest-benchmark statistic for host-clock times (default: median; min resists "
                             "other load on a shared machine)")
    parser.add_argument("--no-plots", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        sections = load(args.results, args.stat)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        parser.error(f"cannot read the results: {err!r}")
    if not sections:
        parser.error("no fused_residual benchmarks in the given files")
    out_dir = args.out_dir or args.results[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {} if args.no_plots else {s.slug: plot(s, section_timer(s, args.timer), out_dir) for s in sections}
    (out_dir / "report.md").write_text(render(sections, args.timer, plots))
    print_summary(sections, args.timer)
    print(f"wrote {out_dir / 'report.md'}" + "".join(f", {n}" for names in plots.values() for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
