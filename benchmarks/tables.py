"""Markdown tables of a report: speed (with spread and rounds), both clocks, memory, cold start, sources."""

from __future__ import annotations

from collections.abc import Iterable

from .analysis import PAIRED, RATIOS, Spread, achieved, flagged, paired_spread, ratio, ratio_spread, ratios, seconds
from .cases import FUSED, IMPLS, REFERENCE, RO_FUSED, RO_REFERENCE
from .results import Record, Row, Section

# The clocks of the both-clocks tables: (name, timer, what it is).
CLOCKS = (("wall", "do_bench", "do_bench median of the whole call"),
          ("host", "host", "perf_counter around calls without synchronizing"),
          ("GPU", "gpu", "kernel times summed by torch.profiler"))
# Implementation pairs the both-clocks tables compare: (title, reference side, fused side, their column labels).
CLOCK_PAIRS = (("eager vs fused", REFERENCE, FUSED, ("eager", "fused")),
               ('both under torch.compile(mode="reduce-overhead")', RO_REFERENCE, RO_FUSED, ("ro ref", "ro fused")))


def ms(t: float | None) -> str:
    return "—" if t is None else f"{t * 1e3:.3f}" if t < 1 else f"{t * 1e3:.1f}"


def us(t: float | None) -> str:
    if t is None:
        return "—"
    value = t * 1e6
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def x(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}x"


def x_spread(s: Spread | None) -> str:
    """``1.02x (0.98-1.05)``: the ratio and its interquartile range where recorded."""
    if s is None:
        return "—"
    if s.q1 is None or s.q3 is None:
        return x(s.value)
    return f"{s.value:.2f}x ({s.q1:.2f}-{s.q3:.2f})"


def count(n: float | None) -> str:
    return "—" if n is None else f"{n:g}"


def size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(cells) + " |" for cells in body]]


def _present(rows: list[Row], names: Iterable[str]) -> list[str]:
    return [n for n in names if any(n in r.records for r in rows)]


def _rounds(row: Row, timer: str) -> str:
    """Timed rounds of eager / fused (/ paired pairs), as far as recorded."""
    def of(record: Record | None) -> str:
        if record is None:
            return "—"
        n = record.stats.get("rounds") if timer == "pytest" else record.extra.get("do_bench_rounds")
        return "—" if n is None else str(n)

    cells = [of(row.records.get(REFERENCE)), of(row.records.get(FUSED))]
    paired = paired_spread(row)
    if paired is not None:
        cells.append("—" if paired.rounds is None else str(paired.rounds))
    return " / ".join(cells)


def speed_table(section: Section, rows: list[Row], timer: str) -> list[str]:
    """Times (ms) per implementation and the ratios; eager/fused (and paired) with their interquartile range in
    parentheses; the rounds behind them; a note on flagged rows."""
    impls = _present(rows, IMPLS)
    ratio_cols = [name for name, num, den in RATIOS if num in impls and den in impls]
    has_paired = any(paired_spread(r) is not None for r in rows)
    if has_paired:
        ratio_cols.insert(1, PAIRED)
    cuda = section.device == "cuda"
    with_rounds = any(set(_rounds(r, timer).split(" / ")) != {"—"} for r in rows)
    rounds_label = ["rounds eager / fused" + (" / pairs" if has_paired else "")] if with_rounds else []
    header = ["shape", "dtype", "mode", *[f"{i} ms" for i in impls], *ratio_cols, *rounds_label]
    if cuda:
        header += ["fused GB/s (of copy)", "fused TFLOP/s (of matmul)"]
    header.append("note")
    body = []
    for row in rows:
        r = ratios(row, timer)
        cells = [row.shape, row.dtype, row.mode, *[ms(seconds(row.records.get(i), timer)) for i in impls]]
        for column in ratio_cols:
            if column == "eager/fused":
                cells.append(x_spread(ratio_spread(row, REFERENCE, FUSED, timer)))
            elif column == PAIRED:
                cells.append(x_spread(paired_spread(row)))
            else:
                cells.append(x(r[column]))
        if with_rounds:
            cells.append(_rounds(row, timer))
        if cuda:
            a = achieved(section, row, timer)
            cells.append("—" if a["GBps"] is None else
                         f"{a['GBps']:.0f}" + ("" if a["GBps_frac"] is None else f" ({a['GBps_frac']:.0%})"))
            cells.append("—" if a["TFLOPs"] is None else
                         f"{a['TFLOPs']:.1f}" + ("" if a["TFLOPs_frac"] is None else f" ({a['TFLOPs_frac']:.0%})"))
        cells.append("flagged, not counted" if flagged(row, timer) else "")
        body.append(cells)
    return table(header, body)


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


def clock_table(section: Section, rows: list[Row], a: str, b: str, labels: tuple[str, str]) -> list[str]:
    """Wall, host and GPU time (us per call) of implementations ``a`` and ``b`` side by side with a/b for each,
    the kernels per call, and ``b``'s achieved bandwidth and FLOP rate on GPU time."""
    rows = [r for r in rows if a in r.records and b in r.records]
    if not rows or not any("host_ms" in r.records[b].extra or "gpu_ms" in r.records[b].extra for r in rows):
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
            cells += [us(seconds(row.records[a], timer)), us(seconds(row.records[b], timer)),
                      x(ratio(row, a, b, timer))]
        cells += [count(row.records[i].extra.get("kernels_per_call")) for i in (a, b)]
        rate = achieved(section, row, "gpu", b)
        cells.append(" / ".join("—" if rate[k] is None else f"{rate[k]:.0f}" if k == "GBps" else f"{rate[k]:.1f}"
                                for k in ("GBps", "TFLOPs")))
        row_notes = _compile_notes(row.records[a]) + _compile_notes(row.records[b])
        if row_notes:
            notes.append(f"- {row.shape} {row.dtype} {row.mode}: " + "; ".join(row_notes))
        body.append(cells)
    return [*table(header, body), *([""] + notes if notes else [])]


def clock_tables(section: Section, rows: list[Row]) -> list[str]:
    out = []
    for title, a, b, labels in CLOCK_PAIRS:
        found = clock_table(section, rows, a, b, labels)
        if found:
            out += [f"Both clocks, {title}:", "", *found, ""]
    return out


def memory_table(section: Section, rows: list[Row]) -> list[str]:
    """Training step: peak CUDA memory, or on CPU the bytes saved for backward."""
    key = "peak_bytes" if section.device == "cuda" else "saved_activation_bytes"
    rows = [r for r in rows if r.mode == "train" and any(key in rec.extra for rec in r.records.values())]
    if not rows:
        return []
    impls = [i for i in IMPLS if any(i in r.records and key in r.records[i].extra for r in rows)]
    body = []
    for row in rows:
        values = {i: row.records[i].extra.get(key) if i in row.records else None for i in impls}
        eager, fused = values.get("eager"), values.get("fused")
        body.append([row.shape, row.dtype, *[size(values[i]) for i in impls],
                     x(fused / eager) if fused is not None and eager else "—"])
    what = ("peak CUDA memory of one training step beyond what was allocated before it" if section.device == "cuda"
            else "activation bytes saved for backward by one training step (saved-tensor hooks, unique "
                 "storages, parameters excluded)")
    return [f"Memory: {what}.", "", *table(["shape", "dtype", *impls, "fused/eager"], body)]


def flagged_lines(section: Section, timer: str) -> list[str]:
    found = [(row, flagged(row, timer)) for row in section.ordered_rows()]
    found = [(row, why) for row, why in found if why]
    if not found:
        return []
    return ["### Flagged, not counted", "",
            "Eager and fused timed in alternation and timed separately disagree by more than 20% here: the load "
            "on the machine changed between the separate benchmarks. These cases are left out of the summary "
            "and the targets.", "",
            *[f"- {row.kind} {row.shape} {row.dtype} {row.mode}: {why}" for row, why in found]]


def progress(section: Section, source: dict) -> str:
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


def source_lines(section: Section) -> list[str]:
    lines = []
    for s in section.sources:
        commit = (s["commit"] or "unknown")[:12] + (" (uncommitted changes)" if s.get("dirty") else "")
        threads = f", {s['torch_threads']} torch threads" if s.get("torch_threads") and section.device == "cpu" else ""
        done = progress(section, s)
        lines.append(f"- `{s['file']}`: {s['date']}, commit {commit}, torch {s['torch']}, triton {s['triton']}, "
                     f"shape set {s['shape_set']}{threads}" + (f"; {done}" if done else ""))
        # JSON lines carry the ceilings in each CUDA case's extra_info, not in the session line.
        c = s.get("ceilings") or next((r.extra["ceilings"] for row in section.rows.values()
                                       for r in row.records.values() if r.extra.get("ceilings")), None)
        if c and section.device == "cuda":
            mm = ", ".join(f"{k} {v:.0f}" for k, v in c.get("matmul_TFLOPs", {}).items())
            tf32 = "" if c.get("allow_tf32") is None else f" (allow_tf32={c['allow_tf32']})"
            lines.append(f"  - ceilings measured in this run: copy {c['copy_GBps']:.0f} GB/s (read + write); "
                         f"{c.get('matmul_n', 8192)}^3 matmul TFLOP/s: {mm}{tf32}")
    return lines


def cold_start_lines(section: Section) -> list[str]:
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
        verdict = (f" The cold-start target, first forward + backward at a new width with an empty cache <= "
                   f"{TARGET_S:.0f} s on an H100: **{'met' if met else 'NOT met'}** (at most {max(firsts):.2f} s)"
                   f"{where}.")
    header = ["rows x width", "dtype", "backend", "Triton cache", "first fwd+bwd s", "second s", "process s",
              "import s", "kernels in cache", "outcome"]
    return ["### Cold start", "",
            "A fresh process per line; `empty`: a new, empty `TRITON_CACHE_DIR`, `warm`: a second process on the "
            "cache the first filled (compiled kernels from disk, autotuning again: Triton's default), `warm_tuned`: "
            "a third with `TRITON_CACHE_AUTOTUNING=1` (the autotuners' choices from disk too) "
            "(`python -m benchmarks.cold_start`)." + verdict, "", *table(header, body)]


def summary_table(lines: list[dict]) -> list[str]:
    header = ["kind", "dtype", "mode", "shapes", "flagged", "geomean eager/fused", "min eager/fused",
              f"geomean {PAIRED}", f"min {PAIRED}", "geomean host eager/fused", "geomean GPU eager/fused",
              "geomean compile/fused", "geomean ro ref/fused", "geomean fused/bare-gemm"]
    plain = ("kind", "dtype", "mode", "shapes", "flagged")
    header = [h for h in header if h in plain[:4] or any(line[h] for line in lines)]
    return table(header, [[str(line[h]) if h in plain else x(line[h]) for h in header] for line in lines])

