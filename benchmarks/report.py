"""``python -m benchmarks.report RESULTS.json [...] [-o OUTDIR]``: pytest-benchmark JSON -> markdown + plots.

Writes ``OUTDIR/report.md`` (default OUTDIR: the first JSON's folder) and one PNG per (device, dtype, mode):
the fused block's speed-up over the eager reference (the paired ratio where recorded) against width, one line
per row count (dashed: over torch.compile). Prints a short summary table. Each device gets its own section
and plots: CPU and GPU results are never mixed.

Per (shape, dtype, mode) the table gives median times (ms) and the ratios eager/fused, compile/fused,
max-autotune/fused, addmm-act/fused (> 1: fused is faster) and fused/bare-gemm (the fused block's cost over
its GEMMs alone; 1 is the floor). CPU runs add "eager/fused paired": the two timed in alternation, the median
of the per-pair ratios (steadier when other processes share the cores). On CUDA also the fused block's
achieved bandwidth and FLOP rate, as a fraction of the ceilings measured in the same run (a 1 GiB
device-to-device copy, 8192^3 matrix products).

Timer: ``auto`` (default) takes the do_bench medians (CUDA events, L2 flushed) for a device whose results all
have them, else the pytest-benchmark medians (host clock around step + synchronize); or choose one.
``--stat min`` uses the pytest-benchmark minimum instead of the median (steadier on a shared machine).
Reads only extra_info written by ``benchmarks/harness.py``: impl, device, device_name, dtype, mode, kind,
rows, width, blocks, flops, bytes, peak_bytes, saved_bytes, do_bench_ms, ceilings.
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
from typing import TextIO

IMPLS = ("eager", "compile", "max-autotune", "fused", "bare-gemm", "addmm-act")
# (column, numerator impl, denominator impl): time ratios.
RATIOS = (
    ("eager/fused", "eager", "fused"),
    ("compile/fused", "compile", "fused"),
    ("max-autotune/fused", "max-autotune", "fused"),
    ("addmm-act/fused", "addmm-act", "fused"),
    ("fused/bare-gemm", "fused", "bare-gemm"),
)
PAIRED = "eager/fused paired"  # median of per-pair ratios, eager and fused timed in alternation
TIMERS = ("auto", "pytest", "do_bench")
DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}
MODE_ORDER = {"forward": 0, "train": 1}


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
    host_s: float | None  # the chosen pytest-benchmark statistic (default: median), seconds
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
    sources: list[dict] = field(default_factory=list)  # per JSON file: environment + ceilings

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
        blocks=int(info.get("blocks") or 0), impl=info["impl"], host_s=stats.get(stat),
        do_bench_ms=info.get("do_bench_ms"), extra=info,
    )


def load(paths: Iterable[Path], stat: str = "median") -> list[Section]:
    """Results grouped by device; ``stat``: which pytest-benchmark statistic is the host-clock time."""
    sections: dict[tuple[str, str], Section] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        machine = (data.get("machine_info") or {}).get("fused_residual") or {}
        commit = data.get("commit_info") or {}
        source = {
            "file": Path(path).name,
            "date": machine.get("date") or data.get("datetime"),
            "commit": machine.get("commit") or commit.get("id"),
            "dirty": machine.get("dirty", commit.get("dirty")),
            "torch": machine.get("torch"),
            "triton": machine.get("triton"),
            "shape_set": machine.get("shape_set"),
            "torch_threads": machine.get("torch_threads"),
            "ceilings": (machine.get("ceilings") or {}).get("cuda"),
        }
        for bench in data.get("benchmarks", []):
            record = _record(bench, stat)
            if record is None:
                continue
            section = sections.setdefault((record.device, record.device_name),
                                          Section(record.device, record.device_name, stat=stat))
            if source not in section.sources:
                section.sources.append(source)
            key = record.row_key
            row = section.rows.setdefault(key, Row(record.kind, record.blocks, record.rows, record.width,
                                                   record.dtype, record.mode))
            row.records[record.impl] = record  # a later file wins
    return [sections[k] for k in sorted(sections)]


# ----------------------------------------------------------------------------------------------- numbers


def section_timer(section: Section, timer: str) -> str:
    """``pytest`` or ``do_bench``: ``auto`` picks do_bench when every result of the section has it."""
    if timer != "auto":
        return timer
    records = [r for row in section.rows.values() for r in row.records.values()]
    return "do_bench" if records and all(r.do_bench_ms is not None for r in records) else "pytest"


def seconds(record: Record | None, timer: str) -> float | None:
    if record is None:
        return None
    if timer == "do_bench":
        return None if record.do_bench_ms is None else record.do_bench_ms * 1e-3
    return record.host_s


def ratios(row: Row, timer: str) -> dict[str, float | None]:
    """Each RATIOS column: time(numerator) / time(denominator), None where one is missing; and PAIRED, the
    eager/fused ratio timed in alternation (CPU runs record it)."""
    out: dict[str, float | None] = {}
    for name, num, den in RATIOS:
        a, b = seconds(row.records.get(num), timer), seconds(row.records.get(den), timer)
        out[name] = a / b if a is not None and b else None
    fused = row.records.get("fused")
    out[PAIRED] = None if fused is None else fused.extra.get("paired_eager_over_impl")
    return out


def ceilings(section: Section, row: Row) -> dict | None:
    for record in row.records.values():
        if record.extra.get("ceilings"):
            return record.extra["ceilings"]
    return next((s["ceilings"] for s in section.sources if s.get("ceilings")), None)


def achieved(section: Section, row: Row, timer: str, impl: str = "fused") -> dict[str, float | None]:
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
            "geomean compile/fused": geomean(r["compile/fused"] for r in per_row),
            "geomean fused/bare-gemm": geomean(r["fused/bare-gemm"] for r in per_row),
        })
    return lines


# ----------------------------------------------------------------------------------------------- markdown


def _ms(t: float | None) -> str:
    return "—" if t is None else f"{t * 1e3:.3f}" if t < 1 else f"{t * 1e3:.1f}"


def _x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


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


def _source_lines(section: Section) -> list[str]:
    lines = []
    for s in section.sources:
        commit = (s["commit"] or "unknown")[:12] + (" (uncommitted changes)" if s.get("dirty") else "")
        threads = f", {s['torch_threads']} torch threads" if s.get("torch_threads") and section.device == "cpu" else ""
        lines.append(f"- `{s['file']}`: {s['date']}, commit {commit}, torch {s['torch']}, triton {s['triton']}, "
                     f"shape set {s['shape_set']}{threads}")
        c = s.get("ceilings")
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
           "Made by `python -m benchmarks.report` from pytest-benchmark JSON. Times in ms; a ratio a/b above 1 "
           "means b is faster. `fused/bare-gemm` is the fused block's time over its GEMMs alone (`torch.mm`, "
           "no epilogues): 1.00x is the floor.", ""]
    for section in sections:
        t = section_timer(section, timer)
        out += [f"## {section.title}", "", *_source_lines(section), "", f"Timer: {_timer_text(t, section.stat)}.", ""]
        loads = [r.extra["loadavg_1m"] for row in section.rows.values() for r in row.records.values()
                 if r.extra.get("loadavg_1m") is not None]
        if loads:
            out += [f"Machine load (1-minute average) when each benchmark started: {min(loads):.2f} to "
                    f"{max(loads):.2f} (other processes share the cores: read ratios with that in mind).", ""]
        ordered = [section.rows[k] for k in sorted(section.rows)]
        for kind, title in (("block", "Residual block"), ("net", "Whole net (blocks x rows x width)")):
            rows = [r for r in ordered if r.kind == kind]
            if rows:
                out += [f"### {title}", "", *_speed_table(section, rows, t), ""]
                memory = _memory_table(section, rows)
                if memory:
                    out += [*memory, ""]
        out += ["### Summary", "", *_summary_table(summary(section, t)), ""]
        if section.device == "cpu":
            out += [_cpu_target(section, t), ""]
        for name in plots.get(section.slug, []):
            out += [f"![{name}]({name})", ""]
    return "\n".join(out).rstrip() + "\n"


def _summary_table(lines: list[dict]) -> list[str]:
    header = ["kind", "dtype", "mode", "shapes", "geomean eager/fused", "min eager/fused",
              f"geomean {PAIRED}", f"min {PAIRED}", "geomean compile/fused", "geomean fused/bare-gemm"]
    header = [h for h in header if any(line[h] is not None for line in lines)]
    return _table(header, [[str(line[h]) if h in ("kind", "dtype", "mode", "shapes") else _x(line[h])
                            for h in header] for line in lines])


def _cpu_target(section: Section, timer: str) -> str:
    """Issue 2's CPU target on the block shapes: eager/fused >= 0.95 everywhere, geomean >= 1.2; judged on each
    of the ratios the run has (separate benchmarks, and timed in alternation)."""
    blocks = [ratios(r, timer) for r in section.rows.values() if r.kind == "block"]
    verdicts = []
    for column in ("eager/fused", PAIRED):
        speedups = [r[column] for r in blocks if r[column] is not None]
        if speedups:
            worst, mean = min(speedups), geomean(speedups)
            met = worst >= 0.95 and mean >= 1.2
            verdicts.append(f"{column}: {'met' if met else 'NOT met'} (min {worst:.2f}x, geomean {mean:.2f}x over "
                            f"{len(speedups)} shapes)")
    if not verdicts:
        return ""
    return ("Issue 2 target (blocks, both modes): eager/fused >= 0.95x on every shape and >= 1.20x geomean. "
            + "; ".join(verdicts) + ".")


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
        lines = ((eager, "-o", "vs eager" + (" (paired)" if eager == PAIRED else "")),
                 ("compile/fused", "--s", "vs compile"))
        for i, n in enumerate(row_counts):
            series = sorted((r for r in rows if r.rows == n), key=lambda r: r.width)
            for column, style, label in lines:
                points = [(r.width, ratios(r, timer)[column]) for r in series]
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


def print_summary(sections: list[Section], timer: str, file: TextIO | None = None) -> None:
    file = file or sys.stdout
    for section in sections:
        text = _timer_text(section_timer(section, timer), section.stat).split(" (")[0]
        print(f"{section.title} ({text})", file=file)
        print("\n".join(_summary_table(summary(section, section_timer(section, timer)))), file=file)
        if section.device == "cpu":
            print(_cpu_target(section, section_timer(section, timer)), file=file)
        print(file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("-o", "--out-dir", type=Path, default=None,
                        help="where to write (default: the first JSON's folder)")
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
