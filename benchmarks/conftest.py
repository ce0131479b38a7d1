"""pytest configuration of the benchmark suite.

Timing is opt-in: without one of ``--benchmark-only``, ``--benchmark-enable``, ``--benchmark-json``,
``--benchmark-save``, ``--benchmark-autosave``, ``--benchmark-compare`` or ``--benchmark-histogram`` the run
is a smoke run (``--benchmark-disable``: every case built, parity-checked and run once), so that a plain
``python -m pytest -q`` stays quick.

Shape set: ``--bench-shapes smoke|quick|reduced|full`` or ``FUSED_RESIDUAL_BENCH_SHAPES``; by default ``smoke``
when not timing and ``reduced`` when timing. ``--bench-seconds S``: timed seconds per benchmark. ``--quick``: the
quick set, timed, ``QUICK_SECONDS`` per benchmark unless ``--bench-seconds`` says otherwise.
CUDA cases exist only where CUDA is available and carry the ``cuda`` marker (``-m cuda`` selects them).
A timed run prints a progress line after each case: "n of N cases, elapsed, ETA".

``--bench-jsonl PATH`` appends one JSON line per finished case to PATH (``records.py``), flushed at once, so a
run stopped at a time limit keeps what it measured; it turns timing on. The cases run in ``cases.priority``
order across both files (measured shapes' eager/fused pairs first).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from . import cases, cli, clocks, env_info, harness, records

SHAPES_ENV = "FUSED_RESIDUAL_BENCH_SHAPES"
TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_json", "benchmark_save", "benchmark_autosave",
                  "benchmark_compare", "benchmark_histogram", "bench_jsonl", "bench_quick")
QUICK_SECONDS = 0.3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_residual benchmarks")
    group.addoption("--bench-shapes", choices=cases.SHAPE_SETS, default=None,
                    help=f"shape set (default: ${SHAPES_ENV}, else smoke when not timing, reduced when timing)")
    group.addoption("--bench-seconds", type=cli.positive(float), default=None,
                    help="timed seconds per benchmark (default: 1 on CPU, 0.25 on CUDA; --quick: "
                         f"{QUICK_SECONDS})")
    group.addoption("--quick", dest="bench_quick", action="store_true", default=False,
                    help="the quick set, timed: on CPU under 3 minutes on 2 cores (eager vs fused, no "
                         "torch.compile); turns timing on")
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
    chosen = (config.getoption("--bench-shapes") or ("quick" if config.getoption("bench_quick") else None)
              or os.environ.get(SHAPES_ENV, "").strip())
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
    seconds = request.config.getoption("--bench-seconds")
    if seconds is None and request.config.getoption("bench_quick"):
        seconds = QUICK_SECONDS
    return harness.Settings(seconds=seconds)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fused_residual"] = {
        **env_info.environment(),
        "shape_set": shape_set(config),
        "ceilings": clocks.measured_ceilings(),
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
    if planned and _timing_enabled(session.config) and not session.config.option.collectonly:
        session.config.stash[_PROGRESS] = _Progress(len(planned))  # the progress line's N
    if path and planned and not session.config.option.collectonly:
        records.append(path, {"type": "session", "fused_residual": env_info.environment(),
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


# ------------------------------------------------------------------------------------------------ progress


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(done: int, total: int, elapsed_s: float) -> str:
    """``"12 of 52 cases, 1m05s elapsed, ETA 3m37s"``: the remaining cases at the mean pace so far."""
    eta = elapsed_s / done * (total - done) if done else None
    return (f"{done} of {total} cases, {_duration(elapsed_s)} elapsed, "
            + ("ETA unknown" if eta is None else f"ETA {_duration(eta)}"))



class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()


_PROGRESS = pytest.StashKey[_Progress]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    progress = item.config.stash.get(_PROGRESS, None)
    case = case_of(item)
    if progress is None or case is None:
        return
    progress.done += 1
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        line = progress_line(progress.done, progress.total, time.perf_counter() - progress.start)
        reporter.write_line(f"[benchmarks] {line}: {case.id}")
