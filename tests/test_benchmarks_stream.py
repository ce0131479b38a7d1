"""A benchmark run that is stopped keeps what it measured; gpu_check.sh's plumbing, in its CPU dry-run mode.

Both start real subprocesses on the CPU (tiny benchmarks, a few seconds of timing each).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import records, report  # noqa: E402


def benchmark_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in records.read(path)[0] if r.get("type") == "benchmark"]


def test_a_killed_benchmark_run_keeps_every_case_it_finished(tmp_path):
    jsonl, pytest_json = tmp_path / "bench.jsonl", tmp_path / "bench.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks", "-m", "not cuda",
               "-k", "cpu and not compile", "--bench-shapes", "smoke", "--bench-seconds", "0.05",
               "--bench-jsonl", str(jsonl), "--benchmark-json", str(pytest_json)]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(benchmark_lines(jsonl)) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)  # no chance to write anything on the way out
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    found, unreadable = records.read(jsonl)
    (session,) = [r for r in found if r["type"] == "session"]
    finished = benchmark_lines(jsonl)
    assert len(finished) >= 2 and unreadable == 0
    assert len(finished) < len(session["planned"]), "the run ended before it was killed: nothing was tested"
    assert not pytest_json.exists() or pytest_json.stat().st_size == 0  # what the first GPU check lost
    assert [r["id"] for r in finished] == session["planned"][:len(finished)]
    first = finished[0]
    assert first["outcome"] == "passed" and first["stats"]["rounds"] >= 1
    assert first["id"] == "cpu-fp32-forward-block-16x10-eager"  # priority order: an eager/fused pair first
    assert first["extra_info"]["impl"] == "eager" and first["extra_info"]["parity_out"] == 0.0

    out = tmp_path / "report"
    assert report.main([str(jsonl), "-o", str(out), "--no-plots"]) == 0
    markdown = (out / "report.md").read_text()
    assert f"{len(finished)} of {len(session['planned'])} planned cases finished (the run stopped" in markdown
    assert "| 16 x 10 | fp32 | forward |" in markdown


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_dry_run_reports_and_records_the_named_commit(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "GPU_CHECK_CPU_DRY_RUN": "1", "GPU_CHECK_SKIP": "tests-cuda tests-general",
           "FUSED_RESIDUAL_COMMIT": "test-commit-not-a-real-one", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = (out / "steps.txt").read_text()
    for name in ("bench", "cold-start", "report", "host-time"):
        assert f"\n{name}" in "\n" + steps and f"{name:<14} rc=0" in steps, steps
    assert "tune           skipped   CPU dry run" in steps
    assert json.loads((out / "env.json").read_text())["commit"] == "test-commit-not-a-real-one"
    session = next(r for r in records.read(out / "bench.jsonl")[0] if r["type"] == "session")
    assert session["fused_residual"]["commit"] == "test-commit-not-a-real-one"
    cold = [r for r in records.read(out / "cold_start.jsonl")[0] if r["type"] == "cold_start"]
    assert [r["cache"] for r in cold] == ["empty", "warm"] and all(r["outcome"] == "passed" for r in cold)
    assert [r["autotune_cache"] for r in cold] == [True, False]  # the CPU runs no third (warm_tuned) process
    host = [r for r in records.read(out / "host_time.jsonl")[0] if r["type"] == "host_time"]
    assert [(r["mode"], r["route"]) for r in host] == [("forward", "whole_block"), ("train", "whole_block")]
    assert "== host time per cached call" in done.stdout
    markdown = (out / "report.md").read_text()
    assert "commit test-commit-" in markdown and "### Cold start" in markdown
    assert "4 of 4 planned cases finished" in markdown
    last = done.stdout.rstrip().splitlines()[-1]  # the report's summary ends the output: here the cold start
    assert last.startswith("| 256 x 64 | fp32 |") and "| warm |" in last and last.endswith("| passed |")
