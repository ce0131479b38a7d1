"""Results as JSON lines, appended and flushed the moment each benchmark finishes.

A run stopped at its time limit, interrupted or killed keeps every case it finished (pytest-benchmark writes its
JSON only when the session ends: the first GPU check lost every timing that way). ``python -m benchmarks.report``
reads these files as well as pytest-benchmark JSON.

Each line is one JSON object with a ``type``:

- ``session``: written when a run starts: ``fused_residual`` (``harness.environment()``: date, versions,
  commit), ``shape_set``, ``timing`` and ``planned`` (the case ids in run order), so that a report can say how
  much of a stopped run finished.
- ``benchmark``: one case: ``id``, ``outcome`` (passed, failed or skipped), ``message`` (why it failed or was
  skipped), ``group``, ``name``, ``extra_info`` (what ``harness.run_case`` recorded) and ``stats``
  (pytest-benchmark's statistics in seconds; null when timing was disabled). Shaped like an entry of
  pytest-benchmark's ``benchmarks`` list.
- ``cold_start``: one process of ``python -m benchmarks.cold_start``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MESSAGE_CHARS = 600  # enough for the first lines of an assertion message


def append(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one line and push it to the disk before returning."""
    line = json.dumps(record, default=str) + "\n"
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
