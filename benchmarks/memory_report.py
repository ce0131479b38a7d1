"""The memory benchmark's table, report page and plot (records of ``benchmarks/memory.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .memory import IMPLS, TARGETS

MIB = 1 << 20
LABELS = {"reference": "reference (eager)", "fused": "fused, default", "recompute": "fused, recompute=True",
          "checkpoint": "checkpoint of the reference"}
COLORS = {"reference": "tab:gray", "fused": "#1f77b4", "recompute": "#2ca02c", "checkpoint": "#d62728"}


def _target(record: dict[str, Any], name: str) -> float | None:
    """The target of a case at the size the targets are stated for (4096 x 256, fp32), else None."""
    if (record["rows"], record["width"], record["dtype"]) != (4096, 256, "fp32"):
        return None
    return TARGETS.get((record["kind"], name))


def _judged(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"<= {target:.2f} {'met' if ratio <= target + 1e-9 else 'MISSED'}"


def _time(info: dict[str, Any]) -> str:
    t = info.get("step_ms")
    return "" if not t else f"{t['median']:.2f} [{t['q1']:.2f}-{t['q3']:.2f}]"


def _case_title(record: dict[str, Any]) -> str:
    shape = f"{record['rows']} x {record['width']}"
    what = {"block": "reference block", "net": f"net of {record['blocks']} blocks", "ffn": (
        f"FFN form (hidden {record['hidden']}, gelu, no final activation)")}[record["kind"]]
    return (f"{what}, {shape}, {record['dtype']}, {record['device']}, "
            f"x {'requires grad' if record['x_grad'] else 'frozen'}")


def table(found: list[dict[str, Any]]) -> str:
    """Markdown: one row per (case, implementation), and each case's recompute / default step-time ratio."""
    cuda = any("peak_bytes" in info for r in found for info in r["impls"].values())
    head = ["case", "implementation", "kept MiB", "x reference", "target", *(["peak MiB"] if cuda else []),
            "step ms [IQR]", "parity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in found:
        for name in IMPLS:
            info = r["impls"].get(name)
            if info is None:
                continue
            ratio = r["kept_over_reference"][name]
            cells = [r["case"], LABELS[name], f"{info['kept']['nbytes'] / MIB:.2f}", f"{ratio:.3f}",
                     _judged(ratio, _target(r, name))]
            if cuda:
                cells.append(f"{info['peak_bytes'] / MIB:.1f}" if "peak_bytes" in info else "")
            cells += [_time(info), f"{info['parity']:.1e}" if "parity" in info else ""]
            lines.append("| " + " | ".join(cells) + " |")
        t = r.get("recompute_over_fused_time")
        if t:
            notes.append(f"- {r['case']}: recompute / default step time {t['median']:.2f}x "
                         f"[{t['q1']:.2f}-{t['q3']:.2f}] over {t['n']} rounds")
    return "\n".join(lines + ([""] + notes if notes else []))


def plot(found: list[dict[str, Any]], path: Path) -> Path:
    """Bytes kept and step time per implementation, as multiples of the reference's, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = found
    panels = [("bytes kept for backward / reference's", lambda r, n: r["kept_over_reference"].get(n))]
    if any(info.get("step_ms") for r in cases for info in r["impls"].values()):
        panels.append(("step time / reference's (median)", _time_ratio))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.6 * len(cases)), 3.4 * len(panels)), squeeze=False)
    width = 0.8 / len(IMPLS)
    for ax, (title, value) in zip(axes[:, 0], panels, strict=True):
        for k, name in enumerate(IMPLS):
            xs, ys = [], []
            for i, r in enumerate(cases):
                v = value(r, name)
                if v is not None:
                    xs.append(i + (k - (len(IMPLS) - 1) / 2) * width)
                    ys.append(v)
            if xs:
                ax.bar(xs, ys, width, label=LABELS[name], color=COLORS[name])
            if value is not _time_ratio:
                for i, r in enumerate(cases):
                    target = _target(r, name)
                    if target is not None:
                        x0 = i + (k - (len(IMPLS) - 1) / 2) * width
                        ax.plot([x0 - width / 2, x0 + width / 2], [target, target], color="black", lw=1.5)
        ax.axhline(1.0, color="0.27", lw=0.6, ls=":")
        ax.set_ylabel(title, fontsize=8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{r['kind']} {r['rows']}x{r['width']}\nx {'grad' if r['x_grad'] else 'frozen'}"
                            for r in cases], fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("black ticks: targets (4096 x 256, fp32); dotted: the reference", fontsize=8, y=0.01,
                 va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_ratio(record: dict[str, Any], name: str) -> float | None:
    info, ref = record["impls"].get(name, {}), record["impls"]["reference"]
    if not info.get("step_ms") or not ref.get("step_ms"):
        return None
    return info["step_ms"]["median"] / ref["step_ms"]["median"]


def write_report(found: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """``memory.md`` (the table, what each case is, how it was measured) and ``memory.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = found[0].get("environment", {}) if found else {}
    method = found[0].get("method", {}) if found else {}
    lines = ["# Memory kept for backward", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, {env.get('gpu') or env.get('cpu')}, commit "
             f"{env.get('commit')}{' (dirty)' if env.get('dirty') else ''}, {env.get('date')}; backend "
             f"{found[0]['backend'] if found else '?'}; timing: {method.get('rounds')} interleaved rounds of "
             f"{method.get('inner')} steps.", "",
             "Cases:", *(f"- `{r['case']}`: {_case_title(r)}" for r in found), "",
             table(found), "", "![bytes kept and step time](memory.png)", ""]
    page = out / "memory.md"
    page.write_text("\n".join(lines))
    return [page, plot(found, out / "memory.png")]
