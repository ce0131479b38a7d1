"""Results as JSON lines, appended and flushed the moment each benchmark finishes.

A run stopped at its time limit, interrupted or killed keeps every case it finished (pytest-benchmark writes its
JSON only when the session ends: the first GPU check lost every timing that way). ``python -m benchmarks.report``
reads these files as well as pytest-benchmark JSON.

Each line is one JSON object with a ``type``:

- ``session``: written when a run starts: ``fused_residual`` (``env_info.environment()``: date, versions,
  commit), ``shape_set``, ``timing`` and ``planned`` (the case ids in run order), so that a report can say how
  much of a stopped run finished.
- ``benchmark``: one case: ``id``, ``outcome`` (passed, failed or skipped), ``message`` (why it failed or was
  skipped), ``group``, ``name``, ``extra_info`` (what ``harness.run_case`` recorded) and ``stats``
  (pytest-benchmark's statistics in seconds; null when timing was disabled). Shaped like an entry of
  pytest-benchmark's ``benchmarks`` list.
- ``cold_start``: one process of ``python -m benchmarks.cold_start``.

``python -m benchmarks.records compact RUN.json OUT.jsonl`` turns a pytest-benchmark JSON dump (every round's time:
tens of thousands of lines) into these lines, one per case, with the statistics and without the raw rounds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

MESSAGE_CHARS = 600  # enough for the first lines of an assertion message


def append(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one line and push it to the disk before returning."""
    line = json.dumps(record, default=str) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file, and how many lines could not be read (a line cut short by a kill)."""
    found: list[dict[str, Any]] = []
    unreadable = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(record, dict):
            found.append(record)
        else:
            unreadable += 1
    return found, unreadable


def benchmark_stats(fixture: Any) -> dict[str, float] | None:
    """pytest-benchmark's statistics of a finished fixture (seconds), None when nothing was timed."""
    metadata = getattr(fixture, "stats", None)
    stats = getattr(metadata, "stats", None)
    if not stats:
        return None
    return {k: v for k, v in stats.as_dict().items() if isinstance(v, int | float)}


def benchmark_record(case_id: str, group: str, name: str, outcome: str, fixture: Any = None,
                     message: str | None = None) -> dict[str, Any]:
    """The ``benchmark`` line of one case."""
    return {
        "type": "benchmark",
        "id": case_id,
        "outcome": outcome,
        "message": None if message is None else message[:MESSAGE_CHARS],
        "group": group,
        "name": name,
        "extra_info": dict(getattr(fixture, "extra_info", None) or {}),
        "stats": benchmark_stats(fixture),
    }


def compact(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """A pytest-benchmark JSON dump as records: a ``session`` line (no plan: such a dump holds only what
    finished), then one ``benchmark`` line per case with its statistics but not every round's time."""
    machine = dict((dump.get("machine_info") or {}).get("fused_residual") or {})
    commit = dump.get("commit_info") or {}
    machine["date"] = machine.get("date") or dump.get("datetime")
    machine["commit"] = machine.get("commit") or commit.get("id")
    machine.setdefault("dirty", commit.get("dirty"))
    session = {"type": "session", "fused_residual": machine, "shape_set": machine.pop("shape_set", None),
               "timing": True, "planned": None, "compacted_from": "pytest-benchmark JSON"}
    lines = [session]
    for bench in dump.get("benchmarks") or []:
        stats = {k: v for k, v in (bench.get("stats") or {}).items() if isinstance(v, int | float)}
        lines.append({"type": "benchmark", "id": bench.get("param") or bench.get("name"), "outcome": "passed",
                      "message": None, "group": bench.get("group"), "name": bench.get("name"),
                      "extra_info": bench.get("extra_info") or {}, "stats": stats})
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "compact":
        print("usage: python -m benchmarks.records compact RUN.json OUT.jsonl", file=sys.stderr)
        return 2
    try:
        run = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # a usage error: the file named is missing or not JSON
        print(f"python -m benchmarks.records: error: {argv[1]}: {error}", file=sys.stderr)
        return 2
    lines = compact(run)
    Path(argv[2]).write_text("".join(json.dumps(line, default=str) + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {argv[2]}: {len(lines) - 1} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
