"""Plots of a report: one PNG per (device, kind, dtype), one panel per mode, the fused module's speed-up over the
eager reference (time ratio eager/fused, above 1: fused is faster) per shape.

Every point carries its interquartile range as a bar and its round count as ``n=``; a point whose run recorded no
spread has no bar, and the caption says so. Points stand alone where each width was measured at one row count;
where a width has several row counts, x is the row count and one line joins the points of one width (never
points of different widths). Alternated pairs (CPU) and separate benchmarks are drawn side by side; a flagged
case (the two disagree by more than 20%) is marked and left out of every summary.
"""

from __future__ import annotations

import textwrap

from .analysis import Spread, flagged, paired_spread, ratio_spread
from .cases import FUSED, MODE_CAPTIONS, REFERENCE
from .results import KIND_TITLES, Row, Section


def _series(rows: list[Row], timer: str) -> tuple[dict[str, list[tuple[Row, Spread]]], bool]:
    """The points of one panel by series ("paired", "separate"), and whether any lacks its spread."""
    out: dict[str, list[tuple[Row, Spread]]] = {"paired": [], "separate": []}
    for row in rows:
        paired = paired_spread(row)
        if paired is not None:
            out["paired"].append((row, paired))
        separate = ratio_spread(row, REFERENCE, FUSED, timer)
        if separate is not None:
            out["separate"].append((row, separate))
    missing = any(s.q1 is None or s.q3 is None for points in out.values() for _, s in points)
    return out, missing


STYLE = {  # series -> (marker, filled, offset in x, legend)
    "paired": ("o", True, -1, "alternated with eager: median of per-pair ratios"),
    "separate": ("s", False, 1, "separate benchmarks: ratio of medians (bar: span of the two IQRs)"),
}


def caption(section: Section, modes: list[str], missing_spread: bool, timer: str) -> str:
    clock = ("wall time, triton.testing.do_bench" if timer == "do_bench"
             else f"pytest-benchmark {section.stat} over rounds")
    text = [f"Speed-up = eager time / fused time ({clock}); above 1: fused is faster.",
            *[MODE_CAPTIONS.get(m, m) + "." for m in modes],
            "Bars: interquartile range; n: timed rounds (pairs for alternated timing)."]
    if missing_spread:
        text.append("A point without a bar: this run recorded no spread for it.")
    if any(flagged(r, timer) for r in section.rows.values()):
        text.append("Red x: flagged, alternated and separate timing disagree by more than 20%; not counted.")
    return " ".join(text)


def _draw_panel(ax, rows: list[Row], timer: str, categorical: bool, colors: list[str]) -> bool:
    import matplotlib.ticker as ticker

    series, _ = _series(rows, timer)
    widths = sorted({r.width for r in rows})
    color = {w: colors[i % len(colors)] for i, w in enumerate(widths)}
    shapes = sorted({(r.width, r.rows) for r in rows})
    position = {shape: i for i, shape in enumerate(shapes)}
    drawn = False
    both = all(series.values())  # side by side only when both series are there
    for name, points in series.items():
        marker, filled, offset, _ = STYLE[name]
        offset = offset if both else 0
        by_width: dict[int, list[tuple[float, Spread, Row]]] = {}
        for row, spread in points:
            if categorical:
                x = position[(row.width, row.rows)] + 0.15 * offset
            else:
                x = row.rows * 2 ** (0.08 * offset)
            by_width.setdefault(row.width, []).append((x, spread, row))
        for width, found in by_width.items():
            found.sort(key=lambda item: item[0])
            for x, spread, row in found:
                has_bar = spread.q1 is not None and spread.q3 is not None
                yerr = [[spread.value - spread.q1], [spread.q3 - spread.value]] if has_bar else None
                ax.errorbar([x], [spread.value], yerr=yerr, fmt=marker, color=color[width], capsize=3,
                            markerfacecolor=color[width] if filled else "white", markersize=5)
                if spread.rounds:  # paired counts below their points, separate ones above: no overlap
                    below = name == "paired"
                    anchor = (spread.q1 if below else spread.q3) if has_bar else spread.value
                    ax.annotate(f"n={spread.rounds}", (x, anchor), textcoords="offset points",
                                xytext=(0, -9 if below else 4), ha="center", fontsize=6)
                if flagged(row, timer):
                    ax.plot([x], [spread.value], "x", color="red", markersize=9, mew=2)
                drawn = True
            if not categorical and len(found) > 1 and name == ("paired" if series["paired"] else "separate"):
                ax.plot([f[0] for f in found], [f[1].value for f in found], "-", color=color[width], linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log", base=2)  # ratios: 2x faster and 2x slower sit as far from 1
    ax.margins(y=0.15)  # room for the round counts above and below the outermost bars
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    if categorical:
        ax.set_xticks(range(len(shapes)), [f"{r} x {w}" for w, r in shapes], rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(shapes) - 0.4)
        ax.set_xlabel("rows x width")
    else:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("rows (one line per width)")
    ax.grid(True, axis="y", alpha=0.3)
    return drawn


def plot(section: Section, timer: str, out_dir) -> list[tuple[str, str]]:
    """Writes the section's PNGs into ``out_dir``; returns ``[(file name, caption), ...]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    panels: dict[tuple[str, str], dict[str, list[Row]]] = {}
    for row in section.ordered_rows():
        panels.setdefault((row.kind, row.dtype), {}).setdefault(row.mode, []).append(row)
    for (kind, dtype), by_mode in panels.items():
        modes = list(by_mode)
        every = [r for rows in by_mode.values() for r in rows]
        if not any(_series(rows, timer)[0]["separate"] or _series(rows, timer)[0]["paired"]
                   for rows in by_mode.values()):
            continue
        width_rows: dict[int, set[int]] = {}
        for r in every:
            width_rows.setdefault(r.width, set()).add(r.rows)
        categorical = all(len(v) == 1 for v in width_rows.values())
        fig_width = 4.2 * len(modes) + 1
        fig, axes = plt.subplots(1, len(modes), figsize=(fig_width, 4.6), sharey=True, squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            _draw_panel(ax, by_mode[mode], timer, categorical, colors)
            ax.set_title(mode, fontsize=9)
        axes[0][0].set_ylabel("speed-up of fused (eager time / fused time)")
        missing = any(_series(rows, timer)[1] for rows in by_mode.values())
        text = caption(section, modes, missing, timer)
        handles = [Line2D([], [], marker=STYLE[s][0], linestyle="", color="black",
                          markerfacecolor="black" if STYLE[s][1] else "white", label=STYLE[s][3])
                   for s in STYLE if any(_series(rows, timer)[0][s] for rows in by_mode.values())]
        if not categorical:
            widths = sorted(width_rows)
            handles += [Line2D([], [], color=colors[i % len(colors)], label=f"width {w}")
                        for i, w in enumerate(widths)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=2, fontsize=7,
                   frameon=False)
        fig.suptitle(f"{section.device_name} ({section.device}): {KIND_TITLES.get(kind, kind)}, {dtype}",
                     fontsize=10, y=0.99)
        chars_per_line = int(fig_width * 19)  # what fits across the figure at this font size
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(text, chars_per_line)), fontsize=6.5, va="bottom")
        fig.tight_layout(rect=(0, 0.1, 1, 0.88))
        name = f"speedup-{section.slug}-{kind}-{dtype}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append((name, text))
    return written
