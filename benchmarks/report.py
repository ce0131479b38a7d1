"""``python -m benchmarks.report RESULTS [...] [-o OUTDIR]``: benchmark results -> markdown + plots.

RESULTS: the suite's JSON lines (``--bench-jsonl``, ``python -m benchmarks.cold_start --out``; ``records.py``),
pytest-benchmark JSON (``--benchmark-json``) or the first GPU run's ``blocks.json``, in any mix. JSON lines are read
as far as they go: a run stopped at its time limit is reported with what it finished, and how much of its plan
that was.

Writes ``OUTDIR/report.md`` (default OUTDIR: the first file's folder) and one PNG per (device, kind, dtype), one
panel per mode (``plots.py``): the fused module's speed-up over the eager reference per shape, with its
interquartile range and round count on every point. Prints a short summary, on CUDA a compact table of both
clocks last. Each device gets its own section and plots: CPU and GPU results are never mixed.

Per (shape, dtype, mode) the table gives median times (ms) and the ratios eager/fused (with its spread),
compile/fused, max-autotune/fused, addmm-act/fused (> 1: fused is faster) and fused/bare-gemm (the fused block's
cost over its GEMMs alone; 1 is the floor), and the rounds behind them. CPU runs add "eager/fused paired": the
two timed in alternation, the median of the per-pair ratios with their interquartile range. A case whose paired and
separate ratios disagree by more than 20% is flagged and not counted (``analysis.py``). On CUDA also the fused
block's achieved bandwidth and FLOP rate, as a fraction of the ceilings measured in the same run, and both clocks:
wall (do_bench of the whole call), host (perf_counter around calls without synchronizing) and GPU time (kernel
times summed by torch.profiler), then the GPU targets and the cold start.

Timer: ``auto`` (default) takes the do_bench medians for a device whose results all have them, else the
pytest-benchmark medians (host clock around step + synchronize); or choose one. ``--stat min`` uses the
pytest-benchmark minimum instead of the median.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from . import cli, plots, tables
from .analysis import (
    PAIRED,
    RO,
    TIMERS,
    achieved,
    cpu_target,
    cuda_targets,
    geomean,
    ratio,
    ratios,
    seconds,
    section_timer,
    summary,
)
from .cases import FUSED, MODE_CAPTIONS, REFERENCE, RO_FUSED, RO_REFERENCE
from .results import KIND_TITLES, Row, Section, load

__all__ = ["PAIRED", "RO", "Row", "Section", "achieved", "cpu_target", "cuda_targets", "geomean", "load", "main",
           "print_summary", "ratio", "ratios", "render", "section_timer", "summary"]


def _timer_text(timer: str, stat: str = "median") -> str:
    return ("`triton.testing.do_bench` median (CUDA events, L2 flushed before each call)" if timer == "do_bench"
            else f"pytest-benchmark {stat} over rounds (host clock around one step plus synchronize)")


def render(sections: list[Section], timer: str, figures: dict[str, list[tuple[str, str]]]) -> str:
    out = ["# fused_residual benchmarks", "",
           "Made by `python -m benchmarks.report`. Times in ms (us in the both-clocks tables); a ratio a/b above "
           "1 means b is faster; in parentheses its interquartile range where the run recorded one. "
           "`fused/bare-gemm` is the fused block's time over its GEMMs alone (`torch.mm`, no epilogues): 1.00x is "
           f"the floor. `{RO}`: the reference over the fused module, both under "
           '`torch.compile(mode="reduce-overhead")` (CUDA graphs).', "",
           "Modes: " + "; ".join(text for mode, text in MODE_CAPTIONS.items()
                                 if any(row.mode == mode for s in sections for row in s.rows.values())) + ".", ""]
    for section in sections:
        t = section_timer(section, timer)
        out += [f"## {section.title}", "", *tables.source_lines(section), "",
                f"Timer: {_timer_text(t, section.stat)}.", ""]
        out += [*section.notes, *([""] if section.notes else [])]
        if section.device == "cuda" and any("gpu_ms" in r.extra or "host_ms" in r.extra
                                            for row in section.rows.values() for r in row.records.values()):
            out += ["Both clocks: " + "; ".join(f"{name}: {what}" for name, _, what in tables.CLOCKS)
                    + " (us per call). Wall time = host time + the GPU time the host could not hide.", ""]
        loads = [r.extra["loadavg_1m"] for row in section.rows.values() for r in row.records.values()
                 if r.extra.get("loadavg_1m") is not None]
        if loads:
            out += [f"Machine load (1-minute average) when each benchmark started: {min(loads):.2f} to "
                    f"{max(loads):.2f} (other processes share the cores: read ratios with that in mind).", ""]
        for kind, title in KIND_TITLES.items():
            rows = section.ordered_rows(kind)
            if rows:
                out += [f"### {title}", "", *tables.speed_table(section, rows, t), ""]
                if section.device == "cuda":
                    out += tables.clock_tables(section, rows)
                memory = tables.memory_table(section, rows)
                if memory:
                    out += [*memory, ""]
        flagged = tables.flagged_lines(section, t)
        if flagged:
            out += [*flagged, ""]
        if section.rows:
            out += ["### Summary", "", "Over the cases not flagged.", "", *tables.summary_table(summary(section, t)),
                    ""]
        if section.device == "cpu" and section.rows:
            out += [cpu_target(section, t), ""]
        if section.device == "cuda":
            targets = cuda_targets(section)
            if targets:
                out += ["### Targets", "", *targets, ""]
        cold = tables.cold_start_lines(section)
        if cold:
            out += [*cold, ""]
        if section.unmeasured:
            out += ["### Not measured", ""]
            out += [f"- `{u['id']}`: {u['outcome']}" + (f": {u['message']}" if u["message"] else "")
                    for u in section.unmeasured]
            out.append("")
        for name, text in figures.get(section.slug, []):
            out += [f"![{name}]({name})", "", f"*{text}*", ""]
    return "\n".join(out).rstrip() + "\n"


def compact_clocks(section: Section) -> list[str]:
    """Wall, host and GPU time per shape, eager vs fused, in us: the table gpu_check.sh prints last."""
    header = ["shape", "dtype", "mode", "wall e/f us", "wall e/f", "host e/f us", "host e/f", "GPU e/f us", "GPU e/f",
              "kernels e/f", f"wall {RO}"]
    body = []
    for row in section.ordered_rows():
        if REFERENCE not in row.records or FUSED not in row.records:
            continue
        eager, fused = row.records[REFERENCE], row.records[FUSED]
        cells = [row.shape, row.dtype, row.mode]
        for _, timer, _ in tables.CLOCKS:
            cells += [f"{tables.us(seconds(eager, timer))} / {tables.us(seconds(fused, timer))}",
                      tables.x(ratio(row, REFERENCE, FUSED, timer))]
        cells += [f"{tables.count(eager.extra.get('kernels_per_call'))} / "
                  f"{tables.count(fused.extra.get('kernels_per_call'))}",
                  tables.x(ratio(row, RO_REFERENCE, RO_FUSED, "do_bench"))]
        body.append(cells)
    return tables.table(header, body) if body else []


def print_summary(sections: list[Section], timer: str, file: TextIO | None = None) -> None:
    """Per device: the summary table (CPU: and the CPU target); on CUDA the targets, the cold start and, last,
    the compact table of both clocks."""
    file = file or sys.stdout
    for section in sections:
        t = section_timer(section, timer)
        text = _timer_text(t, section.stat).split(" (")[0]
        print(f"{section.title} ({text})", file=file)
        if section.rows:
            print("\n".join(tables.summary_table(summary(section, t))), file=file)
        if section.device == "cpu" and section.rows:
            print(cpu_target(section, t), file=file)
        for source in section.sources:
            if tables.progress(section, source):
                print(f"{source['file']}: {tables.progress(section, source)}", file=file)
        if section.unmeasured:
            print(f"not measured: {len(section.unmeasured)} case(s) failed or skipped (report.md lists them)",
                  file=file)
        if section.device == "cuda":
            for line in cuda_targets(section):
                print(line, file=file)
        cold = tables.cold_start_lines(section)
        if cold:
            print("\n".join(cold[2:]), file=file)
        both = (compact_clocks(section) if section.device == "cuda" and any(
            "host_ms" in r.extra for row in section.rows.values() for r in row.records.values()) else [])
        if both:
            print("\nBoth clocks, eager / fused (us per call; "
                  f"{'; '.join(f'{n}: {w}' for n, _, w in tables.CLOCKS)}):", file=file)
            print("\n".join(both), file=file)
        print(file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0],
                                     formatter_class=cli.HelpWithDefaults)
    parser.add_argument("results", nargs="+", type=Path,
                        help="the suite's JSON lines (--bench-jsonl, benchmarks.cold_start --out), pytest-benchmark "
                             "JSON (--benchmark-json) or the first GPU run's blocks.json")
    parser.add_argument("-o", "--out-dir", type=Path, default=None,
                        help="where to write report.md and the plots (default: the first file's folder)")
    parser.add_argument("--timer", choices=TIMERS, default="auto", help="which medians to use")
    parser.add_argument("--stat", choices=("median", "min", "mean"), default="median",
                        help="pytest-benchmark statistic for host-clock times")
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
    figures = {} if args.no_plots else {s.slug: plots.plot(s, section_timer(s, args.timer), out_dir)
                                        for s in sections}
    (out_dir / "report.md").write_text(render(sections, args.timer, figures))
    print_summary(sections, args.timer)
    names = [name for found in figures.values() for name, _ in found]
    print(f"wrote {out_dir / 'report.md'}" + "".join(f", {n}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
