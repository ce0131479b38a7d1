"""The numbers a report shows: times on each clock, ratios with their spread, flagged cases, summaries, targets.

A ratio a/b above 1 means b is faster. Its spread:
- separate benchmarks (each side timed on its own): from each side's interquartile range, ``[q1(a) / q3(b),
  q3(a) / q1(b)]``, with the smaller side's round count;
- alternated pairs (CPU, ``eager/fused paired``): the interquartile range of the per-pair ratios.

A case whose paired and separate eager/fused ratios disagree by more than ``DISAGREEMENT`` (20%) is flagged: the
machine's load moved between the separate benchmarks, so neither number can be trusted alone. Flagged cases are
listed, plotted as such and left out of every summary and target.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .cases import CUDA_MEASURED_SHAPES, FUSED, REFERENCE, RO_FUSED, RO_REFERENCE, RO_TARGET_MAX_WIDTH
from .results import Record, Row, Section

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
DISAGREEMENT = 1.2  # paired vs separate eager/fused: beyond this factor apart, the case is flagged
TIMERS = ("auto", "pytest", "do_bench")  # the speed table's; "host" and "gpu" are the other clocks
CPU_TARGET = (0.95, 1.05)  # blocks, every mode: eager/fused >= 0.95x on every shape, geomean >= 1.05x


@dataclass(frozen=True)
class Spread:
    """A value with its interquartile range (None where the run did not record one) and round count."""

    value: float
    q1: float | None = None
    q3: float | None = None
    rounds: int | None = None


def section_timer(section: Section, timer: str) -> str:
    """``pytest`` or ``do_bench``: ``auto`` picks do_bench when every result of the section has it."""
    if timer != "auto":
        return timer
    found = [r for row in section.rows.values() for r in row.records.values()]
    return "do_bench" if found and all(r.do_bench_ms is not None for r in found) else "pytest"


def seconds(record: Record | None, timer: str) -> float | None:
    """Seconds per call of ``record`` by ``timer``: ``pytest`` (the pytest-benchmark statistic), ``do_bench``
    (wall, CUDA), ``host`` or ``gpu`` (the other two clocks, CUDA)."""
    if record is None:
        return None
    if timer == "pytest":
        return record.pytest_s
    ms = record.do_bench_ms if timer == "do_bench" else record.extra.get(f"{timer}_ms")
    return None if ms is None else ms * 1e-3


def time_spread(record: Record, timer: str) -> Spread | None:
    """The time of ``record`` with its quartiles and rounds, where the run recorded them."""
    value = seconds(record, timer)
    if value is None:
        return None
    if timer == "pytest":
        return Spread(value, record.stats.get("q1"), record.stats.get("q3"), record.stats.get("rounds"))
    if timer == "do_bench":
        q1, q3 = record.extra.get("do_bench_q1_ms"), record.extra.get("do_bench_q3_ms")
        return Spread(value, q1 and q1 * 1e-3, q3 and q3 * 1e-3, record.extra.get("do_bench_rounds"))
    return Spread(value)


def ratio(row: Row, numerator: str, denominator: str, timer: str) -> float | None:
    a, b = seconds(row.records.get(numerator), timer), seconds(row.records.get(denominator), timer)
    return a / b if a is not None and b else None


def ratio_spread(row: Row, numerator: str, denominator: str, timer: str) -> Spread | None:
    """time(numerator) / time(denominator) with the span of the two interquartile ranges."""
    a, b = row.records.get(numerator), row.records.get(denominator)
    sa, sb = (time_spread(a, timer) if a else None), (time_spread(b, timer) if b else None)
    if sa is None or sb is None or not sb.value:
        return None
    value = sa.value / sb.value
    if None in (sa.q1, sa.q3, sb.q1, sb.q3) or not sb.q1 or not sb.q3:
        return Spread(value)
    rounds = min(sa.rounds, sb.rounds) if sa.rounds and sb.rounds else None
    return Spread(value, sa.q1 / sb.q3, sa.q3 / sb.q1, rounds)


def paired_spread(row: Row) -> Spread | None:
    """The eager/fused ratio timed in alternation (CPU runs): median of the per-pair ratios, their IQR."""
    fused = row.records.get(FUSED)
    if fused is None or fused.extra.get("paired_eager_over_impl") is None:
        return None
    info = fused.extra
    return Spread(info["paired_eager_over_impl"], info.get("paired_ratio_q1"), info.get("paired_ratio_q3"),
                  info.get("paired_rounds"))


def ratios(row: Row, timer: str) -> dict[str, float | None]:
    """Each RATIOS column: time(numerator) / time(denominator), None where one is missing; and PAIRED."""
    out: dict[str, float | None] = {name: ratio(row, num, den, timer) for name, num, den in RATIOS}
    paired = paired_spread(row)
    out[PAIRED] = None if paired is None else paired.value
    return out


def flagged(row: Row, timer: str) -> str | None:
    """Why this case is not counted, or None: its paired and separate eager/fused ratios disagree by more than
    20% (only CPU runs time both)."""
    separate, paired = ratio(row, REFERENCE, FUSED, timer), paired_spread(row)
    if separate is None or paired is None or separate <= 0 or paired.value <= 0:
        return None
    if max(separate, paired.value) / min(separate, paired.value) <= DISAGREEMENT:
        return None
    return (f"paired {paired.value:.2f}x vs separate {separate:.2f}x: they disagree by more than "
            f"{DISAGREEMENT - 1:.0%}")


def counted(rows: Iterable[Row], timer: str) -> list[Row]:
    """The rows a summary or target may use: every row that is not flagged."""
    return [r for r in rows if flagged(r, timer) is None]


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


def geomean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(section: Section, timer: str) -> list[dict]:
    """Per (kind, dtype, mode), over the rows not flagged: geomean and min of eager/fused (separate and
    paired), geomeans of the other clocks and ratios, and how many rows were flagged."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in section.ordered_rows():
        groups[(row.kind, row.dtype, row.mode)].append(row)
    lines = []
    for (kind, dtype, mode), every in groups.items():
        rows = counted(every, timer)
        per_row = [ratios(r, timer) for r in rows]
        speedups = [r["eager/fused"] for r in per_row if r["eager/fused"] is not None]
        paired = [r[PAIRED] for r in per_row if r[PAIRED] is not None]
        lines.append({
            "kind": kind, "dtype": dtype, "mode": mode, "shapes": len(speedups), "flagged": len(every) - len(rows),
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


def cpu_target(section: Section, timer: str) -> str:
    """The CPU target on the block shapes not flagged, judged on each ratio the run has (separate benchmarks,
    and timed in alternation): eager/fused >= 0.95x on every shape-mode, geomean >= 1.05x."""
    every = section.ordered_rows("block")
    rows = counted(every, timer)
    blocks = [ratios(r, timer) for r in rows]
    at_least, geomean_at_least = CPU_TARGET
    verdicts = []
    for column in ("eager/fused", PAIRED):
        speedups = [r[column] for r in blocks if r[column] is not None]
        if speedups:
            worst, mean = min(speedups), geomean(speedups)
            met = worst >= at_least and mean >= geomean_at_least
            verdicts.append(f"{column}: {'met' if met else 'NOT met'} (min {worst:.2f}x, geomean {mean:.2f}x over "
                            f"{len(speedups)} shape-modes)")
    if not verdicts:
        return ""
    skipped = len(every) - len(rows)
    return (f"CPU target (blocks, every mode): eager/fused >= {at_least:.2f}x on every shape, geomean >= "
            f"{geomean_at_least:.2f}x. " + "; ".join(verdicts) + "."
            + (f" {skipped} flagged shape-mode(s) not counted." if skipped else ""))


def _judge(label: str, values: list[float], at_least: float | None = None, geomean_at_least: float | None = None,
           of: str = "") -> str | None:
    """One target line: met or NOT met on the values present, with the worst and the geomean."""
    if not values:
        return None
    worst, mean = min(values), geomean(values)
    met = (at_least is None or worst >= at_least) and (geomean_at_least is None or mean >= geomean_at_least)
    return (f"- {label}: **{'met' if met else 'NOT met'}** (min {worst:.2f}x, geomean {mean:.2f}x over "
            f"{len(values)} {of or 'cases'})")


def cuda_targets(section: Section, timer: str = "do_bench") -> list[str]:
    """The GPU targets, judged on the block shapes of the first GPU run that this run has (wall time unless
    named): ratios eager/fused, > 1 means fused is faster."""
    measured = counted([r for r in section.rows.values()
                        if r.kind == "block" and (r.rows, r.width, r.dtype) in CUDA_MEASURED_SHAPES], timer)
    shapes = len({(r.rows, r.width, r.dtype) for r in measured})
    of = "cases of the measured shapes"

    def values(rows: list[Row], num: str, den: str, clock: str = timer, mode: str | None = None) -> list[float]:
        found = [ratio(r, num, den, clock) for r in rows if mode is None or r.mode == mode]
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
    return [f"GPU targets ({shapes} of the {len(CUDA_MEASURED_SHAPES)} block shapes of the first GPU run present; "
            "wall time unless named; a ratio eager/fused above 1 means fused is faster):", "", *lines]
