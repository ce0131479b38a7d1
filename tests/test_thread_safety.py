"""The package's caches under threads: the launch cache (kernels/_launch.py), the route cache and the dispatch
tables. No thread may see another's half-built entry, or an entry built from another thread's call."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from conftest import TRITON_INSTALLED

from fused_residual import dispatch, tables
from fused_residual.activations import REFERENCE_FORM, Form

if TRITON_INSTALLED:
    import triton
    from fused_residual.kernels._launch import CachedLauncher
    from test_launch_cache import TUNED_FLAGS, autotuned, fake, grid, make_args, needs_cache, spy_triton_runs  # noqa: F401 (fake: the fake Triton driver fixture, used by name)
else:
    needs_cache = pytest.mark.skip(reason="needs triton")


def run_threads(target, count: int) -> list[str]:
    """Runs ``target(i)`` in ``count`` threads; returns the exceptions they raised, as text."""
    failures: list[str] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except Exception as e:  # an exception in a thread would not fail the test by itself
            failures.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


@needs_cache
def test_an_entry_stored_after_a_miss_holds_the_config_tuned_for_that_call(fake):
    """Thread A tunes one row bucket; before it stores the entry, thread B tunes another bucket to another config.
    A's entry must hold A's config (and be stored), B's its own."""
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    tuner = autotuned(jit)
    launcher = CachedLauncher(tuner)
    tuned_a, tuned_b = threading.Event(), threading.Event()
    real_run = tuner.run

    def run(*args, **kwargs):
        compiled = real_run(*args, **kwargs)
        if threading.current_thread().name == "A":
            tuned_a.set()
            tuned_b.wait(timeout=1.0)  # B runs now, unless A holds the launcher until its entry is stored
        else:
            tuned_b.set()
        return compiled

    tuner.run = run
    compiled = {}

    def thread_a():
        fake.fast_warps = 8  # the BLOCK 256 config wins
        compiled["A"] = launcher(grid, *make_args(bucket=1024), **TUNED_FLAGS)

    def thread_b():
        tuned_a.wait(timeout=5.0)
        fake.fast_warps = 2  # the BLOCK 64 config wins
        compiled["B"] = launcher(grid, *make_args(bucket=2048), **TUNED_FLAGS)

    threads = [threading.Thread(target=thread_a, name="A"), threading.Thread(target=thread_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tuning = len(runs)
    assert launcher(grid, *make_args(bucket=1024), **TUNED_FLAGS) is compiled["A"]
    assert fake.launches[-1].grid == (triton.cdiv(1000, 256), 1, 1)
    assert launcher(grid, *make_args(bucket=2048), **TUNED_FLAGS) is compiled["B"]
    assert fake.launches[-1].grid == (triton.cdiv(1000, 64), 1, 1)
    assert len(runs) == tuning, "a bucket tuned in a thread was not cached (its entry was refused)"


def test_threads_asking_for_the_tables_at_once_read_each_file_once(tmp_path, monkeypatch):
    """The first calls from several threads at once: one read of each table, every thread gets all of them."""
    import json
    import time

    for name in ("a", "b", "c"):
        table = {"format": 1, "device": name, "capability": [0, 0], "entries": [
            {"dtype": "float32", "width": 32, "rows": 128, "mode": "train", "winner": "torch"}]}
        (tmp_path / f"dispatch-{name}.json").write_text(json.dumps(table))
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(dispatch.TABLE_ENV_VAR, raising=False)
    reads = []
    real_read = tables._read

    def slow_read(path):
        reads.append(path.name)
        time.sleep(0.05)  # long enough for the other threads to arrive meanwhile
        return real_read(path)

    monkeypatch.setattr(tables, "_read", slow_read)
    dispatch.reset()
    seen = []
    start = threading.Barrier(4)

    def ask(_):
        start.wait()
        seen.append(tuple(t.device for t in dispatch.tables()))

    try:
        assert not run_threads(ask, 4)
    finally:
        dispatch.reset()
    assert seen == [("a", "b", "c")] * 4
    assert sorted(reads) == ["dispatch-a.json", "dispatch-b.json", "dispatch-c.json"]


def test_the_route_cache_under_threads_and_resets(use_backend, monkeypatch):
    """Threads route calls of many signatures while another keeps clearing the cache: every route is the CPU
    rule's (the composite up to the row bucket 2048, the torch backend from the bucket 4096; no tables here)."""
    use_backend("auto")
    monkeypatch.setattr(dispatch, "_device_tables", functools.cache(lambda device: ()))
    stop = threading.Event()
    shapes = [(rows, width, training) for rows in (1, 100, 2048, 2049, 9000) for width in (8, 32)
              for training in (False, True)]
    operands = {(rows, width): (torch.empty(rows, width), torch.empty(width, width)) for rows, width, _ in shapes}

    def route_many(i):
        if i == 0:
            while not stop.is_set():
                dispatch.reset()
            return
        try:
            for _ in range(200):
                for rows, width, training in shapes:
                    x, w = operands[rows, width]
                    got = dispatch.route(x, w, None, REFERENCE_FORM, training).name
                    want = "torch" if rows > 2048 else "composite"
                    assert got == want, f"{rows}x{width} training={training}: {got}, expected {want}"
        finally:
            if i == 1:
                stop.set()

    failures = run_threads(route_many, 4)
    stop.set()
    assert not failures, failures
    # A form no table measured takes the same rule: a cached decision for one form is never another's.
    assert dispatch.route(torch.empty(9000, 8), torch.empty(8, 8), None, Form("gelu", None), False).name == "torch"
