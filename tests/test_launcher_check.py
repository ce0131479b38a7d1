"""The launch cache applies only on a backend whose launcher it was checked against (``_launch.launcher_problem``):
NVIDIA's; AMD's HIP launcher takes Triton's own path at every launch. The fake driver, launchers and kernel of
``test_launch_cache.py`` (the real Triton with only the GPU driver faked).
"""

from __future__ import annotations

import types

import pytest

from fused_residual import backends

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _launch  # noqa: E402
from fused_residual.kernels._launch import CachedLauncher  # noqa: E402
from test_launch_cache import (  # noqa: E402
    FLAGS,
    REAL_LAUNCHER_PROBLEM,
    FakeDriver,
    _installed_launcher_shape,
    grid,
    make_args,
    needs_cache,
    spy_triton_runs,
)
from triton.runtime.driver import driver as triton_driver  # noqa: E402


@pytest.fixture
def driver(monkeypatch):
    """The active driver: ``test_launch_cache.py``'s fake, launching nothing, with the installed launcher's shape."""
    fake = FakeDriver(_installed_launcher_shape())
    monkeypatch.setattr(triton_driver, "_active", fake)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    yield fake
    for kernel in fake.jits:  # nothing to unload once the fake driver is gone
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled.module = None


def test_the_active_backends_launcher_is_checked(driver, monkeypatch):
    """The cache makes the call a hit makes only where the active driver's launcher is one it was checked against:
    NVIDIA's, in the installed Triton; not HIP's (AMD GPUs take Triton's own path), nor an unknown one."""
    from triton.backends.amd import driver as amd_driver
    from triton.backends.nvidia import driver as nvidia_driver

    monkeypatch.setattr(_launch, "launcher_problem", REAL_LAUNCHER_PROBLEM)
    driver.launcher_cls = nvidia_driver.CudaLauncher
    assert _launch.launcher_problem() is None
    driver.launcher_cls = amd_driver.HIPLauncher
    assert "triton.backends.amd.driver.HIPLauncher is not one" in _launch.launcher_problem()

    class Renamed(nvidia_driver.CudaLauncher):  # NVIDIA's call under another name: not the class checked
        pass

    driver.launcher_cls = Renamed
    assert "Renamed is not one" in _launch.launcher_problem()
    monkeypatch.setattr(triton_driver, "_active", types.SimpleNamespace())  # a driver without a launcher
    assert "no active Triton driver" in _launch.launcher_problem()


@needs_cache
def test_launches_on_an_unchecked_launcher_always_take_tritons_path(driver, monkeypatch):
    """On a backend whose launcher the cache was not checked against, every launch goes through JITFunction.run
    and nothing is cached (the launch plans then find no entry either)."""
    hip_like = type("HIPLauncher", (driver.launcher_cls,), {"__module__": "triton.backends.amd.driver"})
    driver.launcher_cls = hip_like
    monkeypatch.setattr(_launch, "launcher_problem", REAL_LAUNCHER_PROBLEM)
    jit = driver.jit()
    runs = spy_triton_runs(jit)
    launcher = CachedLauncher(jit)
    args = make_args()
    for _ in range(3):
        launcher(grid, *args, **FLAGS)
    assert runs == [False] * 3 and len(driver.launches) == 3
    assert "HIPLauncher is not one the launch cache was checked against" in launcher.last_refusal
    assert launcher.entry(args, FLAGS) is None
