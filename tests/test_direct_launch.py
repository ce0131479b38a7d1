"""A launch plan's own C launch (``kernels/_direct.py``) makes exactly the call Triton's launcher makes, and only
for a launcher whose source it knows; Triton's global scratch comes from one buffer per (device, stream), and from
a fresh one while a CUDA graph is captured."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from conftest import TRITON_INSTALLED

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")

if TRITON_INSTALLED:
    import triton
    from fused_residual.kernels import _common, _direct, _plan, _tma
    from triton.backends.amd.driver import HIPLauncher
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.runtime import _allocation
    from triton.runtime.driver import driver

KNOWN = ("3.6.0", "3.9.0")  # the Tritons whose CudaLauncher.__call__ _direct.py was written from


def make_launcher(launches: list, scratch: int = 0, cls=None):
    """A ``CudaLauncher`` of the installed Triton without its C module (its constructor compiles one): the C launch
    records its arguments."""
    run = object.__new__(cls or CudaLauncher)
    run.launch = lambda *args: launches.append(args)
    run.num_ctas = 2
    run.global_scratch_size, run.global_scratch_align = scratch, 128
    run.profile_scratch_size, run.profile_scratch_align = 0, 1
    run.launch_cooperative_grid, run.launch_pdl = False, True
    run.gsan_enabled = False
    run.arg_annotations, run.kernel_signature = ("annotations",), b"signature"
    return run


@pytest.fixture
def recording_allocator(monkeypatch):
    """Triton's allocator records what it is asked for; the active driver is a stand-in (3.9's launcher reads it)."""
    monkeypatch.setattr(driver, "_active", SimpleNamespace())
    asked = []
    token = _allocation._allocator.set(lambda size, align, stream: asked.append((size, align, stream)) or "scratch")
    yield asked
    _allocation._allocator.reset(token)


@pytest.mark.parametrize("scratch", [0, 384])
def test_the_plans_launch_is_tritons(recording_allocator, scratch):
    launches: list = []
    run = make_launcher(launches, scratch)
    x, w = torch.empty(4, 3), torch.empty(3, 3)
    # What the launch cache's hit (and JITFunction.run with empty hooks) calls: grid (6, 2, 1), stream 99, the
    # compiled function and its packed metadata, no launch metadata, no hooks, then the bound arguments.
    run(6, 2, 1, 99, "function", "packed", None, None, None, x, w, 5, 40, 7, "constexpr")
    # A recorded launch of the same: registers x and w, one int before the row count M = 40, one after; its grid
    # (min(cdiv(40, 16) * 2, 100), 2) = (6, 2).
    step = _plan.PreparedLaunch(SimpleNamespace(name="kernel"), [0, 1], (5,), (7,), {},
                                lambda meta: (16, 2, 100, 2))
    step.take((run, "function", "packed", ("constexpr",), {}))
    step(40, [x, w], 99)
    assert len(launches) == 2 and launches[1] == launches[0]
    assert recording_allocator == ([(6 * 2 * 2 * scratch, 128, 99)] * 2 if scratch else [])
    if triton.__version__ in KNOWN:
        assert step.fast[4] is run.launch, "the C launch is called directly"


def test_only_a_known_launcher_is_taken_apart():
    launches: list = []
    if triton.__version__ in KNOWN:
        assert _direct.launcher_form(CudaLauncher) is not None
    assert _direct.launcher_form(HIPLauncher) is None  # AMD keeps Triton's launcher

    class Changed(CudaLauncher):
        def __call__(self, *args):
            return super().__call__(*args)

    assert _direct.direct_launch(make_launcher(launches, cls=Changed), "f", "m") is None
    instrumented = make_launcher(launches)
    instrumented.gsan_enabled = True
    assert _direct.direct_launch(instrumented, "f", "m") is None
    profiled = make_launcher(launches)
    profiled.profile_scratch_size = 64
    assert _direct.direct_launch(profiled, "f", "m") is None
    assert _direct.direct_launch(lambda *args: None, "f", "m") is None


def test_the_scratch_is_cached_per_device_and_stream_but_not_while_capturing(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(_common, "current_gpu", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(_tma, "_SCRATCH", {})
    first = _tma._scratch(256, 128, 7)
    assert first.numel() >= 256 and _tma._scratch(200, 128, 7) is first
    assert _tma._scratch(256, 128, 8) is not first  # another stream: its own buffer
    bigger = _tma._scratch(1024, 128, 7)
    assert bigger.numel() >= 1024 and _tma._scratch(256, 128, 7) is bigger
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _tma._scratch(256, 128, 7) is not bigger  # another device, the same stream handle
    assert _tma._scratch(256, 128, None) is not _tma._scratch(256, 128, None)
    capturing[0] = True
    cached = dict(_tma._SCRATCH)
    captured = _tma._scratch(256, 128, 7)
    assert all(captured is not b for b in cached.values()) and _tma._SCRATCH == cached


def test_the_counters_step_takes_the_streams_cached_buffer(monkeypatch):
    from fused_residual.kernels import _reduce

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    device = torch.device("cpu")
    cached = torch.zeros(64, dtype=torch.int32)
    monkeypatch.setattr(_reduce, "_COUNTERS", {("cpu", 0, 5): cached})
    fresh = []
    monkeypatch.setattr(_reduce, "arrival_counters", lambda d, count: fresh.append(count) or torch.zeros(count))
    regs = [None]
    _plan.Counters(0, device, 32)(1, regs, 5)
    assert regs[0] is cached and not fresh
    for count, stream, capture in ((128, 5, False), (32, 6, False), (32, None, False), (32, 5, True)):
        capturing[0] = capture  # too small, another stream, Triton's path, a capture: arrival_counters decides
        _plan.Counters(0, device, count)(1, regs, stream)
        assert regs[0] is not cached and fresh[-1] == count
    assert len(fresh) == 4


def test_the_written_out_replay_does_what_the_steps_do(recording_allocator, monkeypatch):
    """``_replay.compile_steps`` against the step-by-step replay, on a compiled launch: the same allocations, cached
    buffers, launch counts and C launches (the scratch allocator asked the same)."""
    from fused_residual.kernels import _launch, _replay

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cpu = torch.device("cpu")
    launches: list = []

    def launch_step(slots, form, scratch, tail):
        step = _plan.PreparedLaunch(SimpleNamespace(name="kernel"), slots, (5,), (7, "relu"), {},
                                    lambda meta: form)
        step.take((make_launcher(launches, scratch), "function", "packed", tail, {}))
        return step

    rows = _plan.ROWS
    steps = [_plan.Alloc(1, (rows, 8), torch.float32, cpu), _plan.Alloc(2, (3, rows, 2), torch.float16, cpu),
             _plan.Alloc(3, (8,), torch.float16, cpu), _plan.Workspace(4, (100,), cpu), _plan.Counters(5, cpu, 17),
             launch_step([0, 1, 2, 3, 4, 5], (16, 2, 100, 2), 0, ("constexpr", 1.5, None)),  # grid (6, 2)
             launch_step([2, 3], (4, 5, 30, 1), 0, ()),  # (min(10 * 5, 30), 1): capped
             launch_step([1, 0], (0, 0, 7, 1), 384, (float("inf"), object()))]  # (7, 1) for every M

    def described(value):  # a new tensor by its layout (the cached ones are compared by identity below)
        if isinstance(value, tuple):
            return tuple(map(described, value))
        return ("tensor", tuple(value.shape), value.dtype, value.stride()) if isinstance(value, torch.Tensor) else value

    results = []
    for run in (lambda regs: _plan._run(steps, 40, regs, 99), lambda regs: _plan.compile_steps(steps)(40, regs, 99)):
        launches.clear()
        regs = [torch.empty(40, 8)] + [None] * 5
        with _launch.count_launches() as counted:
            run(regs)
        results.append((described(tuple(regs)), regs[4], regs[5], described(tuple(launches)), dict(counted)))
    (generic, ws, counters, generic_launches, generic_counts), (compiled, ws2, counters2, *rest) = results
    assert compiled == generic and ws2 is ws and counters2 is counters
    assert rest == [generic_launches, generic_counts] and generic_counts == {"kernel": 3}
    assert recording_allocator[0] == recording_allocator[1] == (7 * 1 * 2 * 384, 128, 99)
    assert "def replay" in _replay.compile_steps(steps, {}, source=True)


def test_steps_launch_on_the_tensors_device_when_another_is_current(monkeypatch):
    """Triton launches on the current device: a replay whose tensors are on another one takes Triton's path inside
    the tensors' device (as the kernel wrappers do), and so does a recording."""
    entered = []

    class Context:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(_common, "launch_device", Context)
    monkeypatch.setattr(_plan, "_driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 1, get_current_stream=lambda index: 5)))
    seen = []

    def step(rows, regs, stream):
        seen.append((stream, list(entered)))

    device = torch.device("cpu")
    steps = _plan.Steps([step], 1, ["x"], (0,), device)
    steps.gpu = True  # a GPU's steps, device 0, while device 1 is current
    steps(torch.empty(4, 2))
    assert seen == [(None, [device])] and entered == [device, None]
    recorder = _plan.Recorder({"x": torch.empty(4, 2)}, device)
    recorder.run(step)
    assert seen[-1] == (None, [device, None, device])


@pytest.mark.parametrize("inline", [1, 4])
def test_a_steps_whole_call_written_out_does_what_its_steps_do(recording_allocator, monkeypatch, inline):
    """``Steps.compile`` (the call as one function: registers as locals, a family's members as branches, the
    members beyond ``inline`` through the family) against the steps run one by one: the same results, cached
    buffers, launches and counts, for row counts whose family keys were met before and one met there first."""
    from fused_residual.kernels import _launch, _replay

    monkeypatch.setattr(_replay, "INLINE_MEMBERS", inline)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_plan, "_driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda index: 99)))
    cpu = torch.device("cpu")
    launches: list = []

    def launch_step(slots, form):
        step = _plan.PreparedLaunch(SimpleNamespace(name=f"kernel{len(slots)}"), slots, (5,), (7,), {},
                                    lambda meta: form)
        step.take((make_launcher(launches), "function", "packed", ("constexpr",), {}))
        return step

    names = ["x", "out", "ws", "member"]

    def make(k, rows, regs):  # a member: its own allocation and a launch of k programs
        member = [_plan.Alloc(3, (k, 4), torch.float32, cpu), launch_step([0, 3, 2], (0, 0, k, 1))]
        if k == 6:  # a register no member named before (as a split-K workspace after a member without)
            names.append("extra")
            regs.append(None)
            member += [_plan.Alloc(4, (k,), torch.float16, cpu), launch_step([4, 3], (0, 0, 1, 1))]
        _plan._run(member, rows, regs, 99)
        return member

    family = _plan.Family(_plan.RowsKey(0, 10, 8), make)  # k = max(1, min(M // 10, 8))
    steps = _plan.Steps([_plan.Alloc(1, (_plan.ROWS, 8), torch.float32, cpu), _plan.Workspace(2, (100,), cpu),
                         launch_step([0, 1, 2], (16, 2, 100, 2)), family], 1, names, (1, 3, None), cpu)
    steps.gpu = True
    for rows in (40, 20, 85):  # members 4, 2, 8, met through the steps' own path (the first writes them out)
        steps(torch.empty(rows, 8))
    steps.function = None
    text = steps.compile(source=True)
    assert text.count("k == ") == min(inline, 3) and ("_stale()" in text) == (inline > 3)

    def described(value):
        if isinstance(value, tuple):
            return tuple(map(described, value))
        return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    for rows in (40, 20, 85, 33, 61, 62):  # 33, 61: keys 3 and 6, new members (6 with a register of its own)
        results = []
        for whole in (False, True):
            launches.clear()
            x = torch.empty(rows, 8)
            with _launch.count_launches() as counted:
                if whole:
                    out = steps(x)
                else:
                    regs = [x] + [None] * (len(names) - 1)
                    _plan._run(steps.steps, rows, regs, 99)
                    out = steps.take(regs)
            results.append((described(out), described(tuple(launches)), dict(counted)))
        assert results[0] == results[1] and results[0][0][2] is None
        if rows == 33:  # a member met after the function was written: written in next time, if there is room
            assert (steps.function is None) == (inline > 3)
    assert sorted(family.members) == [2, 3, 4, 6, 8]
    assert steps.function is not None and ("k == 3" in inspect.getsource(steps.function)) == (inline > 3)


def test_a_written_out_call_binds_the_active_driver_and_leaves_it_when_another_is_set(recording_allocator,
                                                                                       monkeypatch):
    """With Triton's own driver config, the written-out call reads the active driver without its property and
    calls the getters it had when written; another active driver, or another current device, sends the call
    back to the steps' own path, which asks the driver that is active then."""
    from triton.runtime.driver import DriverConfig

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    first = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda index: 11)
    second = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda index: 22)
    drivers = DriverConfig()
    drivers.set_active(first)
    monkeypatch.setattr(_plan, "_driver", drivers)

    class Step:  # out = x + 1; records the stream and whether the call was written out
        seen: list = []

        def __call__(self, rows, regs, stream):
            self.seen.append(("steps", stream))
            regs[1] = regs[0] + 1

        def emit(self, name, src):
            return [f"{name}.seen.append(('written', stream))", f"{src.reg(1)} = r0 + 1"]

    steps = _plan.Steps([Step()], 1, ["x", "out"], (1,), torch.device("cpu"))
    steps.gpu = True
    x = torch.randn(3, 2)
    for _ in range(2):  # the steps' own path writes the function, which runs the call
        torch.testing.assert_close(steps(x)[0], x + 1)
    source = steps.compile(source=True)
    assert "_drivers._active is not _active" in source and "_plan._driver.active" not in source
    assert Step.seen == [("written", 11)] * 2
    drivers.set_active(second)  # another driver: the steps' own path, on its stream
    torch.testing.assert_close(steps(x)[0], x + 1)
    assert Step.seen[-1] == ("steps", 22)
    drivers.set_active(first)
    torch.testing.assert_close(steps(x)[0], x + 1)
    assert Step.seen[-1] == ("written", 11)
    hook = lambda *args: None  # noqa: E731 - a launch hook (a profiler): Triton's path, which calls it
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        torch.testing.assert_close(steps(x)[0], x + 1)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert Step.seen[-1] == ("steps", None)
    torch.testing.assert_close(steps(x)[0], x + 1)
    assert Step.seen[-1] == ("written", 11)
    first.get_current_device = lambda: 1  # another current device (the written-out call asks the getter it bound)
    steps.function.__globals__["_device"] = first.get_current_device
    torch.testing.assert_close(steps(x)[0], x + 1)
    assert Step.seen[-1] == ("steps", None)
