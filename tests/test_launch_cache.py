"""The launch cache (kernels/_launch.py): Triton's own path for the first launch of a specialization, the compiled
kernel's launcher for the later ones, and the launch counters.

Most tests run the installed Triton's real machinery (JITFunction, Autotuner, argument specialization, a real
compile for sm_90 with the bundled ptxas, CompiledKernel) with only the GPU driver faked: the fake records what
the launcher receives instead of launching. The fake launchers have the call signatures of triton 3.6's and 3.9's
``CudaLauncher`` and, like their C launchers, drop the constexpr arguments. Run this file under each Triton
version the project supports (3.6 on the GPU image, 3.9 here).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from conftest import HAS_CUDA, assert_close, device_params

from fused_residual import backends

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fused_residual.kernels import _launch  # noqa: E402
from fused_residual.kernels._launch import CachedLauncher, count_launches  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

needs_cache = pytest.mark.skipif(_launch.support_problem() is not None,
                                 reason=f"launch cache off on this Triton: {_launch.support_problem()}")


def scale_add(x_ptr, y_ptr, out_ptr, n, stride, M_BUCKET, BLOCK: tl.constexpr, HAS_Y: tl.constexpr,
              SCALE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs * stride, mask=mask).to(tl.float32)
    if HAS_Y:
        x += tl.load(y_ptr + offs * stride, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs * stride, (x * SCALE).to(out_ptr.dtype.element_ty), mask=mask)


def grid(meta):
    return (triton.cdiv(meta["n"], meta["BLOCK"]),)


FLAGS = {"BLOCK": 128, "HAS_Y": True, "SCALE": 2.0}


def make_args(dtype=torch.float32, offset=0, n=1000, stride=2, bucket=1024):
    """Positional arguments of ``scale_add``; ``offset`` elements into a fresh (64-byte aligned) buffer. The fake
    driver launches nothing, so the sizes need not match ``n``."""
    x, y, out = (torch.randn(64 + offset).to(dtype)[offset:] for _ in range(3))
    return (x, y, out, n, stride, bucket)


# --- a fake driver around the real Triton ----------------------------------------------------------------------


@dataclass
class Launch:
    grid: tuple
    stream: int
    function: object
    kernel_metadata: tuple
    launch_metadata: object
    enter_hook: object
    exit_hook: object
    args: tuple  # every argument after the hooks, as the launcher received them
    params: list  # what would reach cuLaunchKernel: the non-constexpr arguments, tensors as pointers


class _FakeLauncher:
    def __init__(self, src, metadata):
        self.types = list(src.signature.values())

    def _launch(self, grid, stream, function, kernel_metadata, launch_metadata, enter_hook, exit_hook, args):
        # What both versions' C launchers do: call the hooks that are not None, leave the constexprs out.
        assert len(args) == len(self.types), "the launcher takes every bound argument"
        if enter_hook is not None:
            enter_hook(launch_metadata)
        params = [a.data_ptr() if isinstance(a, torch.Tensor) else a
                  for a, ty in zip(args, self.types, strict=True) if ty != "constexpr"]
        triton_driver.active.launches.append(
            Launch(grid, stream, function, kernel_metadata, launch_metadata, enter_hook, exit_hook, args, params))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class Launcher36(_FakeLauncher):
    """triton 3.6 ``CudaLauncher.__call__``: everything after ``function`` goes on to the generated C launcher."""

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        kernel_metadata, launch_metadata, enter_hook, exit_hook, *kernel_args = args
        self._launch((gridX, gridY, gridZ), stream, function, kernel_metadata, launch_metadata, enter_hook,
                     exit_hook, tuple(kernel_args))


class Launcher39(_FakeLauncher):
    """triton 3.9 ``CudaLauncher.__call__``."""

    def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata, launch_enter_hook,
                 launch_exit_hook, *args):
        self._launch((gridX, gridY, gridZ), stream, function, kernel_metadata, launch_metadata, launch_enter_hook,
                     launch_exit_hook, args)


class FakeUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return f"module-{device}", f"function-{name}-{device}", 32, 0, 1024

    def unload_module(self, module):
        pass


class FakeDriver:
    def __init__(self, launcher_cls):
        self.launcher_cls = launcher_cls
        self.utils = FakeUtils()
        self.device = 0
        self.launches: list[Launch] = []
        self.fast_warps = 4  # the fake benchmark times the configs with this many warps as the fastest
        self.jits: list[JITFunction] = []

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 7000 + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles):
            kernel_call()
            t = 1.0 if self.launches[-1].kernel_metadata[0] == self.fast_warps else 2.0
            return [t] * len(quantiles)

        return bench

    def jit(self, fn=scale_add, **options) -> JITFunction:
        """A real (compiling) JITFunction, whatever TRITON_INTERPRET says."""
        kernel = JITFunction(fn, **options)
        self.jits.append(kernel)
        return kernel


def _installed_launcher_shape():
    import inspect

    from triton.backends.nvidia import driver as nvidia_driver

    return Launcher39 if "kernel_metadata" in inspect.signature(nvidia_driver.CudaLauncher.__call__).parameters \
        else Launcher36


# The cache's test of the active backend's launcher, before the fake fixture stands its launchers in for NVIDIA's.
REAL_LAUNCHER_PROBLEM = _launch.launcher_problem


@pytest.fixture
def fake(request, monkeypatch):
    drv = FakeDriver(getattr(request, "param", None) or _installed_launcher_shape())
    monkeypatch.setattr(triton_driver, "_active", drv)
    monkeypatch.setattr(_launch, "launcher_problem", lambda: None)  # the fakes have NVIDIA's launchers' shape
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 is its default
    yield drv
    for kernel in drv.jits:  # nothing to unload once the fake driver is gone
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled.module = None


def spy_triton_runs(jit: JITFunction) -> list:
    """Records every call of Triton's ``JITFunction.run`` on ``jit`` (its ``warmup`` flag)."""
    calls = []
    real = jit.run

    def run(*args, **kwargs):
        calls.append(kwargs.get("warmup"))
        return real(*args, **kwargs)

    jit.run = run
    return calls


# --- the two paths -----------------------------------------------------------------------------------------------


@needs_cache
def test_first_launch_goes_through_triton_later_ones_straight_to_the_compiled_kernel(fake):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    args = make_args()
    first = launcher(grid, *args, **FLAGS)
    assert type(first).__name__ == "CompiledKernel" and launcher.last_refusal is None
    assert runs == [False]
    for _ in range(3):
        assert launcher(grid, *args, **FLAGS) is first
    assert launcher(grid, *make_args(), **FLAGS) is first  # fresh tensors, same dtype and alignment
    assert runs == [False], "a cached launch went through JITFunction.run"
    assert len(fake.launches) == 5
    assert len(jit.device_caches[0][0]) == 1


@needs_cache
@pytest.mark.parametrize("fake", [Launcher36, Launcher39], ids=["launcher-3.6", "launcher-3.9"], indirect=True)
@pytest.mark.parametrize("stride", [2, 1], ids=["stride-2", "stride-1-is-constexpr"])
def test_launcher_receives_what_triton_passes_it(fake, stride):
    launcher = CachedLauncher(fake.jit())
    args = make_args(stride=stride)
    x, y, out, n, _, bucket = args
    launcher(grid, *args, **FLAGS)
    launcher(grid, *args, **FLAGS)
    by_triton, cached = fake.launches
    assert cached.grid == by_triton.grid == (triton.cdiv(1000, 128), 1, 1)
    assert cached.stream == by_triton.stream == 7000
    assert cached.function == by_triton.function == "function-scale_add-0"
    assert cached.kernel_metadata == by_triton.kernel_metadata
    # every bound argument in signature order, constexprs included; the launcher drops the constexprs
    expected_args = (x, y, out, n, stride, bucket, FLAGS["BLOCK"], FLAGS["HAS_Y"], FLAGS["SCALE"])
    for received in (by_triton.args, cached.args):
        assert len(received) == len(expected_args)
        assert all(a is b if isinstance(b, torch.Tensor) else a == b
                   for a, b in zip(received, expected_args, strict=True))
    expected_params = [x.data_ptr(), y.data_ptr(), out.data_ptr(), n] + ([stride] if stride != 1 else []) + [bucket]
    assert cached.params == by_triton.params == expected_params
    # Triton passes its (empty) hook chains and metadata; the cache passes None, which the launchers skip
    assert by_triton.enter_hook is knobs.runtime.launch_enter_hook and not by_triton.enter_hook.calls
    assert (cached.launch_metadata, cached.enter_hook, cached.exit_hook) == (None, None, None)


@needs_cache
def test_launch_hooks_see_the_same_launch_on_both_paths(fake):
    launcher = CachedLauncher(fake.jit())
    args = make_args()
    entered, exited = [], []

    def on_enter(metadata):
        entered.append(dict(metadata.get()))

    def on_exit(metadata):
        exited.append(metadata.get()["name"])

    knobs.runtime.launch_enter_hook.add(on_enter)
    knobs.runtime.launch_exit_hook.add(on_exit)
    try:
        launcher(grid, *args, **FLAGS)
        launcher(grid, *args, **FLAGS)
    finally:
        knobs.runtime.launch_enter_hook.remove(on_enter)
        knobs.runtime.launch_exit_hook.remove(on_exit)
    assert len(entered) == 2 and entered[0] == entered[1]
    assert entered[0]["function"] == "function-scale_add-0" and entered[0]["stream"] == 7000
    assert exited == [entered[0]["name"]] * 2
    assert fake.launches[1].enter_hook is knobs.runtime.launch_enter_hook


# --- what the key must hold ---------------------------------------------------------------------------------------


def _variants():
    """name -> (positional args, keyword args, device) of a call Triton compiles differently from the base call."""
    return {
        "dtype": (make_args(dtype=torch.float16), FLAGS, 0),
        "view offset by one element": (make_args(offset=1), FLAGS, 0),
        "stride becomes 1": (make_args(stride=1), FLAGS, 0),
        "stride divisible by 16": (make_args(stride=32), FLAGS, 0),
        "n divisible by 16": (make_args(n=1024), FLAGS, 0),
        "n needs int64": (make_args(n=2**31 + 8), FLAGS, 0),
        "n needs uint64": (make_args(n=2**63 + 8), FLAGS, 0),
        "constexpr flag": (make_args(), {**FLAGS, "HAS_Y": False}, 0),
        "constexpr value": (make_args(), {**FLAGS, "SCALE": 3.0}, 0),
        "num_warps option": (make_args(), {**FLAGS, "num_warps": 8}, 0),
        "device index": (make_args(), FLAGS, 1),
    }


@needs_cache
@pytest.mark.parametrize("variant", list(_variants()))
def test_a_change_triton_specializes_on_misses_the_cache(fake, variant):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    base = launcher(grid, *make_args(), **FLAGS)
    launcher(grid, *make_args(), **FLAGS)
    assert runs == [False]
    args, flags, device = _variants()[variant]
    fake.device = device
    other = launcher(grid, *args, **flags)
    assert runs == [False, False], "the changed call was served from the cache"
    assert launcher.last_refusal is None
    assert other is not base, "Triton compiled nothing new: the variant does not test the key"
    assert launcher(grid, *args, **flags) is other  # ... and is itself cached
    assert runs == [False, False]
    assert fake.launches[-1].args[:len(args)] == fake.launches[-2].args[:len(args)]
    assert fake.launches[-1].function == f"function-scale_add-{device}"
    assert fake.launches[-1].stream == 7000 + device


@needs_cache
def test_a_knob_in_tritons_kernel_key_misses_the_cache(fake):
    launcher = CachedLauncher(fake.jit())
    base = launcher(grid, *make_args(), **FLAGS)
    with knobs.runtime.scope():
        knobs.runtime.debug = True
        debug = launcher(grid, *make_args(), **FLAGS)
        assert debug is not base and debug.metadata.debug
        assert launcher(grid, *make_args(), **FLAGS) is debug
    assert launcher(grid, *make_args(), **FLAGS) is base


@needs_cache
@pytest.mark.parametrize("change", [
    {"n": 1001}, {"n": 17}, {"stride": 48}, {"bucket": 2048}, {"offset": 4}, {"n": 2**31 - 15, "stride": 4096},
], ids=str)
def test_a_change_triton_does_not_specialize_on_hits_the_cache(fake, change):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    base = launcher(grid, *make_args(n=1000, stride=32), **FLAGS)
    changed = make_args(**{"n": 1000, "stride": 32, **change})
    assert launcher(grid, *changed, **FLAGS) is base
    assert runs == [False]
    assert fake.launches[-1].params[3:] == [changed[3], changed[4], changed[5]]
    assert fake.launches[-1].grid == (triton.cdiv(changed[3], 128), 1, 1)


@needs_cache
def test_every_hit_launches_the_kernel_triton_would_launch(fake):
    """Random calls around five specializations on two devices: each launch's kernel is the one Triton's own
    cache holds for that call, and only the first launch of each specialization goes through Triton."""
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    rng = random.Random(0)
    bases = [  # dtype, offset, n values, stride values, flags
        (torch.float32, 0, [1000, 999, 77], [2, 3, 5], FLAGS),
        (torch.float16, 0, [1000, 999, 77], [2, 3, 5], FLAGS),
        (torch.float32, 1, [1000, 999, 77], [2, 3, 5], FLAGS),
        (torch.float32, 0, [1024, 32, 4096], [1], FLAGS),
        (torch.float32, 4, [1000, 999, 77], [16, 48, 4096], {**FLAGS, "HAS_Y": False}),
    ]
    seen = set()
    for _ in range(40):
        which, device = rng.randrange(len(bases)), rng.randrange(2)
        dtype, offset, ns, strides, flags = bases[which]
        args = make_args(dtype, offset, rng.choice(ns), rng.choice(strides), rng.choice([512, 1024, 2048]))
        fake.device = device
        launched = launcher(grid, *args, **flags)
        expected = jit.run(*args, grid=grid, warmup=True, **flags)  # Triton's own choice, launching nothing
        assert launched is expected
        assert all(a is b for a, b in zip(fake.launches[-1].args[:6], args, strict=True))
        assert fake.launches[-1].function == f"function-scale_add-{device}"
        seen.add((which, device))
    assert runs.count(False) == len(seen), "a launch went through Triton after its specialization was cached"


def test_int_classes_are_exactly_tritons_int_specializations():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    values = [-(2**63), -(2**31) - 1, -(2**31), -17, -16, -1, 0, 1, 2, 15, 16, 17, 32, 1000, 2**31 - 16,
              2**31 - 1, 2**31, 2**31 + 16, 2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 1]

    def triton_spec(v):
        return native_specialize_impl(CUDABackend, v, False, True, True)

    for a in values:
        for b in values:
            same_key = _launch._INT_CLASS(a) == _launch._INT_CLASS(b)
            assert same_key == (triton_spec(a) == triton_spec(b)), (a, b, triton_spec(a), triton_spec(b))


def test_a_cached_launch_gives_the_grid_a_dict_equal_to_tritons():
    """On a hit the grid gets its meta-parameters at once and the positional arguments on first need."""
    names = ("x_ptr", "n", "BLOCK", "HAS_Y")
    full = {"x_ptr": "pointer", "n": 1000, "BLOCK": 128, "HAS_Y": True}

    def lazy():
        meta = _launch._BoundArgs({"BLOCK": 128, "HAS_Y": True})
        meta._names, meta._args = names, ("pointer", 1000)
        return meta

    reads = {
        "meta-parameter": lambda m: m["BLOCK"], "positional": lambda m: m["n"], "get": lambda m: m.get("n"),
        "get default": lambda m: m.get("other", 5), "in": lambda m: "n" in m, "iterate": list, "len": len,
        "items": lambda m: list(m.items()), "keys": lambda m: list(m.keys()), "values": lambda m: list(m.values()),
        "repr": repr, "unpack": lambda m: {**m}, "dict()": dict, "==": lambda m: m == full,
        "reflected ==": lambda m: full == m, "!=": lambda m: m != full, "reversed": lambda m: list(reversed(m)),
        "|": lambda m: m | {"z": 1}, "reflected |": lambda m: {"z": 1} | m, "copy": lambda m: m.copy(),
        "bool": bool, "pop": lambda m: (m.pop("n"), dict(m)), "setdefault": lambda m: (m.setdefault("n", 1), m),
    }
    for name, read in reads.items():
        assert read(lazy()) == read(dict(full)), name
    with pytest.raises(KeyError):
        lazy()["other"]


# --- autotuned kernels --------------------------------------------------------------------------------------------


def autotuned(jit, **options):
    configs = [triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 256}, num_warps=8)]
    return triton.autotune(configs=configs, key=["M_BUCKET", "HAS_Y"], **options)(jit)


TUNED_FLAGS = {"HAS_Y": True, "SCALE": 2.0}


@needs_cache
def test_autotuned_kernel_is_tuned_once_per_key_then_launched_with_the_chosen_config(fake):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    tuner = autotuned(jit)
    launcher = CachedLauncher(tuner)
    metas = []

    def recording_grid(meta):
        metas.append(dict(meta))
        return grid(meta)

    fake.fast_warps = 8
    args = make_args(bucket=1024)
    tuned = launcher(recording_grid, *args, **TUNED_FLAGS)
    assert launcher.last_refusal is None and tuner.best_config.kwargs == {"BLOCK": 256}
    by_triton = fake.launches[-1]
    tuning_runs = len(runs)
    assert tuning_runs == 3  # two benchmarked configs, then the launch
    assert launcher(recording_grid, *args, **TUNED_FLAGS) is tuned
    cached = fake.launches[-1]
    assert len(runs) == tuning_runs
    assert cached.grid == by_triton.grid == (triton.cdiv(1000, 256), 1, 1)
    assert cached.kernel_metadata[0] == 8 and cached.params == by_triton.params
    assert cached.args[6:] == (256, True, 2.0)  # BLOCK from the config, then HAS_Y and SCALE
    assert metas[-1] == metas[-2] and metas[-1]["BLOCK"] == 256 and metas[-1]["n"] == 1000

    # a new row bucket re-tunes as the autotuner would (this time the 2-warp config wins) ...
    fake.fast_warps = 2
    other = launcher(recording_grid, *make_args(bucket=2048), **TUNED_FLAGS)
    assert len(runs) == 2 * tuning_runs and other is not tuned
    assert fake.launches[-1].grid == (triton.cdiv(1000, 64), 1, 1)
    # ... and both buckets are then served from the cache with their own config
    assert launcher(recording_grid, *make_args(bucket=1024), **TUNED_FLAGS) is tuned
    assert fake.launches[-1].grid == (triton.cdiv(1000, 256), 1, 1)
    assert launcher(recording_grid, *make_args(bucket=2048), **TUNED_FLAGS) is other
    assert fake.launches[-1].grid == (triton.cdiv(1000, 64), 1, 1) and fake.launches[-1].kernel_metadata[0] == 2
    assert len(runs) == 2 * tuning_runs
    # an autotune-key flag passed by keyword re-tunes too
    launcher(recording_grid, *make_args(bucket=1024), **{**TUNED_FLAGS, "HAS_Y": False})
    assert len(runs) == 3 * tuning_runs


@needs_cache
def test_autotuner_config_with_pre_hook_is_not_cached(fake):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    hooked = []
    tuner = triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2, pre_hook=hooked.append)],
                            key=["M_BUCKET"])(jit)
    launcher = CachedLauncher(tuner)
    launcher(grid, *make_args(), **TUNED_FLAGS)
    launcher(grid, *make_args(), **TUNED_FLAGS)
    assert "pre_hook" in launcher.last_refusal
    assert len(runs) == 2 and len(hooked) == 2


# --- what is never cached ----------------------------------------------------------------------------------------


@needs_cache
def test_heuristics_and_hooks_and_keyword_pointers_take_tritons_path(fake):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    heuristic = CachedLauncher(triton.heuristics({"BLOCK": lambda args: 128})(jit))
    heuristic(grid, *make_args(), HAS_Y=True, SCALE=2.0)
    heuristic(grid, *make_args(), HAS_Y=True, SCALE=2.0)
    assert len(runs) == 2

    by_keyword = CachedLauncher(jit)
    x, y, out, n, stride, bucket = make_args()
    by_keyword(grid, x, y, out, n, stride, M_BUCKET=bucket, **FLAGS)
    assert "M_BUCKET" in by_keyword.last_refusal
    by_keyword(grid, x, y, out, n, stride, M_BUCKET=bucket, **FLAGS)
    assert len(runs) == 4

    hooked = CachedLauncher(jit)
    jit.add_pre_run_hook(lambda *args, **kwargs: None)
    hooked(grid, *make_args(), **FLAGS)
    hooked(grid, *make_args(), **FLAGS)
    assert "pre-run hooks" in hooked.last_refusal and len(runs) == 6


@needs_cache
def test_disabled_cache_takes_tritons_path_and_still_counts(fake, monkeypatch):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    monkeypatch.setattr(_launch, "ENABLED", False)
    with count_launches() as counts:
        for _ in range(3):
            launcher(grid, *make_args(), **FLAGS)
    assert runs == [False] * 3 and counts == {"scale_add": 3}
    monkeypatch.setattr(_launch, "ENABLED", True)
    launcher(grid, *make_args(), **FLAGS)
    launcher(grid, *make_args(), **FLAGS)
    assert len(runs) == 4


def test_environment_variable_disables_the_cache():
    code = "from fused_residual.kernels import _launch; print(_launch.ENABLED)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**__import__("os").environ, "FUSED_RESIDUAL_LAUNCH_CACHE": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected


@needs_cache
def test_count_launches_counts_both_paths_and_clear_forgets(fake):
    jit = fake.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    before = _launch.triton_path_counts().get("scale_add", 0)
    with count_launches() as counts:
        for _ in range(3):
            launcher(grid, *make_args(), **FLAGS)
    assert counts == {"scale_add": 3}
    assert _launch.triton_path_counts()["scale_add"] - before == 1
    assert _launch.launch_counts()["scale_add"] >= 3
    _launch.clear_caches()
    launcher(grid, *make_args(), **FLAGS)
    assert len(runs) == 2


def test_launch_path_check_rejects_a_different_launch_call():
    import inspect

    run_source, tune_source = inspect.getsource(JITFunction.run), inspect.getsource(Autotuner.run)
    assert _launch.launch_path_problem(run_source, tune_source) is None
    assert _launch.support_problem() is None, "the installed Triton is one the cache supports"
    older = run_source.replace("launch_exit_hook, *bound_args.values())", "launch_exit_hook, *non_constexpr_vals)")
    assert older != run_source
    assert "kernel.run" in _launch.launch_path_problem(older, tune_source)
    assert "best_config" in _launch.launch_path_problem(run_source, tune_source.replace("self.best_config", "cfg"))


# --- the compiled kernel agrees with the key ----------------------------------------------------------------------


@needs_cache
def test_entries_are_checked_against_the_compiled_signature(fake):
    jit = fake.jit()
    launcher = CachedLauncher(jit)
    args = make_args(stride=1)
    compiled = launcher(grid, *args, **FLAGS)
    bound = args + (128, True, 2.0)
    src = compiled.src
    assert src.signature["stride"] == "constexpr" and src.constants[(4,)] == 1
    assert _launch._compiled_as_keyed(jit.params, bound, src) is None
    doctored = [
        {"attrs": {**src.attrs, (3,): [["tt.divisibility", 8]]}},  # specialized on something the key lacks
        {"signature": {**src.signature, "n": "i64"}},
        {"constants": {**src.constants, (6,): 64}},
        {"signature": dict(list(src.signature.items())[:-1])},
    ]
    for change in doctored:
        fields = {"signature": src.signature, "constants": src.constants, "attrs": src.attrs, **change}
        assert _launch._compiled_as_keyed(jit.params, bound, types.SimpleNamespace(**fields)) is not None, change


@needs_cache
def test_do_not_specialize_parameters_are_cached(fake):
    jit = fake.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["stride"])
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    calls = [(1, 32), (16, 32), (1000, 32), (1, 32), (16, 48)]
    for n, stride in calls:
        launcher(grid, *make_args(n=n, stride=stride), **FLAGS)
        assert launcher.last_refusal is None
    assert len(jit.device_caches[0][0]) == 1  # Triton compiled one kernel for all of them
    assert runs.count(False) == 3  # and this cache went to Triton once per int class of n
    assert [launch.params[3:5] for launch in fake.launches] == [list(c) for c in calls]


@needs_cache
def test_the_real_launcher_takes_every_bound_argument_and_drops_the_constexprs(fake, monkeypatch):
    """Triton's own launcher code, fed the compiled kernel's signature: one argument per bound parameter, the
    constexpr ones (here ``stride`` == 1 and the three meta-parameters) left out of the kernel parameters."""
    from triton.backends.nvidia import driver as nvidia_driver

    compiled = CachedLauncher(fake.jit())(grid, *make_args(stride=1), **FLAGS)
    src = compiled.src
    kinds = ["constexpr" if ty == "constexpr" else "kernel" for ty in src.signature.values()]
    assert kinds == ["kernel"] * 4 + ["constexpr", "kernel"] + ["constexpr"] * 3
    if hasattr(nvidia_driver, "make_launcher"):  # 3.6: a generated C launcher
        constants = {((src.fn.arg_names.index(k),) if isinstance(k, str) else k): v for k, v in src.constants.items()}
        c_source = nvidia_driver.make_launcher(constants, dict(src.signature), None)
        parse_format = re.search(r'PyArg_ParseTuple\(args, "([^"]*)"', c_source).group(1)
        assert parse_format.startswith(nvidia_driver._BASE_ARGS_FORMAT)
        assert len(parse_format) - len(nvidia_driver._BASE_ARGS_FORMAT) == len(kinds)
        params = re.search(r"void \*params\[\] = \{([^}]*)\}", c_source).group(1)
        assert [p.strip() for p in params.split(",")] == [
            f"&arg{i}" for i, kind in enumerate(kinds) if kind == "kernel"] + ["&global_scratch", "&profile_scratch"]
    elif hasattr(nvidia_driver, "annotate_arguments"):  # 3.9: annotations for the native launcher
        from triton.backends.driver import expand_signature

        monkeypatch.setattr(nvidia_driver, "PyKernelArg", lambda nested_tuple, type: type, raising=False)
        for name in ("ARG_CONSTEXPR", "ARG_KERNEL", "ARG_TUPLE"):
            monkeypatch.setattr(nvidia_driver, name, name[4:].lower(), raising=False)
        annotations = nvidia_driver.annotate_arguments(expand_signature(src.signature.values(), None, "nvTmaDesc"))
        assert annotations == kinds
    else:
        pytest.skip("this Triton's launcher is neither 3.6's nor 3.9's")


# --- the interpreter (and a real GPU launch where there is one) ---------------------------------------------------


@pytest.mark.parametrize("device", device_params())
@pytest.mark.interpreter
def test_launch_through_the_cache_matches_a_direct_launch_and_is_counted(device):
    if device == "cpu" and not knobs.runtime.interpret:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    kernel = triton.jit(scale_add)  # an InterpretedFunction under TRITON_INTERPRET=1
    launcher = CachedLauncher(kernel)
    gen = torch.Generator().manual_seed(0)
    n, stride = 1000, 2

    def grid(meta):  # n from the closure: 3.6's interpreter passes a callable grid its arguments as tl tensors
        return (triton.cdiv(n, meta["BLOCK"]),)

    for dtype in (torch.float32, torch.float16):
        x = torch.randn(n * stride, generator=gen).to(device=device, dtype=dtype)
        y = torch.randn(n * stride, generator=gen).to(device=device, dtype=dtype)
        direct = torch.full_like(x, float("nan"))
        kernel[grid](x, y, direct, n, stride, 1024, **FLAGS)
        before = _launch.triton_path_counts().get("scale_add", 0)
        outs = []
        with count_launches() as counts:
            for _ in range(3):  # on a GPU, the second and third launches are cached
                outs.append(torch.full_like(x, float("nan")))
                launcher(grid, x, y, outs[-1], n, stride, 1024, **FLAGS)
        assert counts == {"scale_add": 3}
        via_triton = _launch.triton_path_counts()["scale_add"] - before
        assert via_triton == (3 if device == "cpu" else 1)
        expected = torch.full((n * stride,), float("nan"), dtype=torch.float64)
        expected[::stride] = (x[::stride].double() + y[::stride].double()).cpu() * 2.0
        for out in outs:
            assert_close(out.cpu(), expected, f"cached launch ({dtype})", dtype=dtype)
            assert torch.equal(out.isnan(), direct.isnan()) and torch.equal(out[::stride], direct[::stride])


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.cuda
def test_cuda_cached_launch_goes_to_the_current_stream_and_into_a_cuda_graph():
    """A cached launch made while a CUDA graph is captured must go to the capture stream: on any other stream
    it would run at once (or fail), and ``out`` would not stay NaN until the replay."""
    launcher = CachedLauncher(triton.jit(scale_add))
    x = torch.randn(1000, device="cuda")
    out = torch.full_like(x, float("nan"))
    launcher(grid, x, x, out, 1000, 1, 1024, **FLAGS)
    launcher(grid, x, x, out, 1000, 1, 1024, **FLAGS)
    torch.cuda.synchronize()
    assert torch.equal(out, x * 4)
    captured = torch.full_like(x, float("nan"))
    graph = torch.cuda.CUDAGraph()
    before = _launch.triton_path_counts().get("scale_add", 0)
    with torch.cuda.graph(graph):
        launcher(grid, x, x, captured, 1000, 1, 1024, **FLAGS)
    assert _launch.triton_path_counts().get("scale_add", 0) == before, "the captured launch was not cached"
    torch.cuda.synchronize()
    assert captured.isnan().all()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, x * 4)
