"""pytest configuration of the benchmark suite.

Timing is opt-in: without one of ``--benchmark-only``, ``--benchmark-enable``, ``--benchmark-json``,
``--benchmark-save``, ``--benchmark-autosave``, ``--benchmark-compare`` or ``--benchmark-histogram`` the run
is a smoke run (``--benchmark-disable``: every case built, parity-checked and run once), so that a plain
``python -m pytest -q`` stays quick.

Shape set: ``--bench-shapes smoke|reduced|full`` or ``FUSED_RESIDUAL_BENCH_SHAPES``; by default ``smoke``
when not timing and ``reduced`` when timing. ``--bench-seconds S``: timed seconds per benchmark.
CUDA cases exist only where CUDA is available and carry the ``cuda`` marker (``-m cuda`` selects them).

``--bench-jsonl PATH`` appends one JSON line per finished case to PATH (``records.py``), flushed at once, so a
run stopped at a time limit keeps what it measured; it turns timing on. The cases run in ``cases.priority``
order across both files (measured shapes' eager/fused pairs first).
"""

from __future__ import annotations

import os

import pytest
import torch

from . import cases, harness, records

SHAPES_ENV = "FUSED_RESIDUAL_BENCH_SHAPES"
TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save", "benchmark_autosave",
                  "benchmark_compare", "benchmark_histogram", "bench_jsonl")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_residual benchmarks")
    group.addoption("--bench-shapes", choices=cases.SHAPE_SETS, default=None,
                    help=f"shape set (default: ${SHAPES_ENV}, else smoke when not timing, reduced when timing)")
    group.addoption("--bench-seconds", type=float, default=None,
                    help="timed seconds per benchmark (default: 1 on CPU, 0.25 on CUDA)")
    group.addoption("--bench-jsonl", metavar="PATH", default=None,
                    help="append one JSON line per finished benchmark to PATH, flushed at once (a stopped run "
                         "keeps what it measured); turns timing on")


def _timing_requested(config: pytest.Config) -> bool:
    return any(config.getoption(name, default=None) for name in TIMING_OPTIONS)


def _timing_enabled(config: pytest.Config) -> bool:
    option = config.option
    return not getattr(option, "benchmark_disable", True) or getattr(option, "benchmark_enable", False)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before pytest-benchmark reads its options: no timing unless asked for.
    if hasattr(config.option, "benchmark_disable") and not _timing_requested(config):
        config.option.benchmark_disable = True


def shape_set(config: pytest.Config) -> str:
    chosen = config.getoption("--bench-shapes") or os.environ.get(SHAPES_ENV, "").strip()
    if chosen:
        if chosen not in cases.SHAPE_SETS:
            raise pytest.UsageError(f"{SHAPES_ENV}={chosen!r}: choose one of {', '.join(cases.SHAPE_SETS)}")
        return chosen
    return "reduced" if _timing_enabled(config) else "smoke"


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_report_header(config: pytest.Config) -> str:
    timing = "timed" if _timing_enabled(config) else "smoke (not timed; --benchmark-only or --benchmark-json to time)"
    return (f"fused_residual benchmarks: shape set {shape_set(config)}, {timing}, "
            f"devices {', '.join(available_devices())}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for argname, kind in (("block_case", "block"), ("net_case", "net"), ("ffn_case", "ffn")):
        if argname in metafunc.fixturenames:
            selected = cases.select(shape_set(metafunc.config), available_devices(), kind)
            metafunc.parametrize(argname, [
                pytest.param(case, id=case.id, marks=[pytest.mark.cuda] if case.device == "cuda" else [])
                for case in selected
            ])


@pytest.fixture(scope="session")
def bench_settings(request: pytest.FixtureRequest) -> harness.Settings:
    return harness.Settings(seconds=request.config.getoption("--bench-seconds"))


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fused_residual"] = {
        **harness.environment(),
        "shape_set": shape_set(config),
        "ceilings": harness.measured_ceilings(),
    }


def case_of(item: pytest.Item) -> cases.Case | None:
    """The Case a collected benchmark item runs, None for any other test."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("block_case") or params.get("net_case") or params.get("ffn_case")
    return case if isinstance(case, cases.Case) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Benchmarks in priority order across test_block.py and test_net.py; every other test keeps its place.
    slots = [i for i, item in enumerate(items) if case_of(item) is not None]
    ordered = sorted((items[i] for i in slots), key=lambda item: cases.priority(case_of(item)))
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


def pytest_collection_finish(session: pytest.Session) -> None:
    path = session.config.getoption("--bench-jsonl")
    planned = [case.id for case in map(case_of, session.items) if case is not None]
    if path and planned and not session.config.option.collectonly:
        records.append(path, {"type": "session", "fused_residual": harness.environment(),
                              "shape_set": shape_set(session.config), "timing": _timing_enabled(session.config),
                              "planned": planned})


def _message(report: pytest.TestReport, call: pytest.CallInfo) -> str | None:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if call.excinfo is not None:
        return call.excinfo.exconly()
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    path = item.config.getoption("--bench-jsonl")
    case = case_of(item)
    if not path or case is None:
        return
    report = outcome.get_result()
    # One line per case: the call's outcome, or the setup's when the case never ran.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        fixture = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
        records.append(path, records.benchmark_record(case.id, case.group, item.name, report.outcome, fixture,
                                                      _message(report, call)))
