"""A stand-in H100/H200 for measuring host (CPU-side) time per call on any CPU: ``with fake_gpu() as gpu: ...``.

Inside the block, the package's Triton routes run on ``meta`` tensors (shapes, dtypes and strides, no data) with
everything the package and Triton do in Python per call kept. Only what needs a GPU is replaced:

- Triton's active driver is its own CUDA driver class built around fake C utilities (no libcuda): ``load_binary``
  returns fake handles, the device properties are an H200's (132 SMs, 232,448 bytes of opt-in shared memory per
  block, sm_90), and the C launch is a no-op: ``utils.launch`` on triton 3.9, the generated per-kernel launcher
  module on triton 3.6 (its C source is still generated, not compiled). It is a C call that does nothing while
  timed (``uncounted()``: a stand-in for the C launcher, whose cost a host-time benchmark leaves out, not a Python
  frame that eager's launches would not pay) and a Python call that counts the launch per kernel otherwise.
  Triton's Python launcher (``CudaLauncher.__call__``: scratch allocation, argument hand-over) runs as on a GPU.
  Kernels are really compiled for sm_90 (Triton's own compiler and the ptxas it bundles; results land in Triton's
  on-disk cache).
- The autotuner times nothing: ``Autotuner._bench`` returns a rank, so it takes the FIRST candidate left after its
  prune, in the kernel's own config order (only that config compiles). A fixed, documented choice: the host path
  of another config differs only in the grid and scratch (persistent and TMA schedules, listed first for sm_90
  16-bit GEMMs, cost the most host work of the candidates).
- ``torch.cuda``'s per-launch C entry points are no-ops (current device 0, raw stream 0, device exchange, capture
  check: ``torch._C`` entries replaced by C builtins such as ``int``); its Python wrappers around them run as in a
  CUDA build (on a CPU build, the stubs that raise are replaced by the CUDA build's two-line wrappers), and
  ``torch.cuda.get_device_properties`` answers the H200's properties.
- The device-facts module ``kernels/_common.py`` answers for ``meta`` what it answers for ``cuda:0``: each function
  defined there whose first parameter is ``device`` (``capability``, ``family``: hopper, ``multiprocessors``,
  ``max_shared_memory``, ``launch_device``, ``is_gpu``, ...) and whose answer for meta differs is wrapped (meta ->
  cuda:0, then the real function) and rebound wherever the package imported it. Cached functions get a cached
  wrapper, so a cached call costs what it costs on a GPU; an uncached one (``launch_device``) costs one extra Python
  call (~0.1 us).
- Triton's global scratch (the TMA schedules' device-side descriptors) comes from the package's own allocator
  (``kernels/_tma.py``), which allocates on the current GPU, ``_common.current_gpu()``: meta here.

``TEMPORARY`` patches (``_temporary_patches``), needed only while package code outside ``kernels/_common.py``
tests ``device.type == "cuda"`` itself; each applies only where that test is still there, so they fall away by
themselves when the package asks ``_common`` instead: the Triton backend's ``unavailable`` and the split-K arrival
counters (``kernels/_reduce.py``). Not patched, and so not measured: ``fused_linear``'s per-launch
``_ensure_scratch_allocator`` check (one ContextVar read, behind ``a.is_cuda``) and the fp32 TF32 test.

Needs a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels when they are decorated). Run
it in a process of its own: Triton's per-device kernel caches keep the fake-compiled kernels after the block.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch

CUDA0 = torch.device("cuda", 0)
META = torch.device("meta")
H200 = types.SimpleNamespace(
    name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=150_754_820_096,
    shared_memory_per_block_optin=232_448, L2_cache_size=60 * 1024 * 1024, warp_size=32, max_threads_per_block=1024,
    regs_per_multiprocessor=65_536, is_integrated=False, is_multi_gpu_board=False, uuid="fake-h200", gcnArchName="",
)
# What triton's C utilities report (``get_device_properties`` of triton's driver.c).
TRITON_PROPERTIES = {"max_shared_mem": 232_448, "max_num_regs": 65_536, "multiprocessor_count": 132,
                     "warpSize": 32, "sm_clock_rate": 1_980_000, "mem_clock_rate": 3_201_000, "mem_bus_width": 6144}


class FakeGpu:
    """What a ``fake_gpu()`` block exposes: the C launches it swallowed, per kernel name."""

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()
        self._names: dict[int, str] = {}
        # What Triton and the package bind as the C launch: a partial (a C callable) over ``count`` that
        # ``uncounted()`` points at a C no-op in place, so that what was bound follows.
        self.launch = functools.partial(self.count)

    def load_binary(self, name, kernel, shared, device):
        handle = len(self._names) + 1
        self._names[handle] = name
        return handle, handle, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def count(self, grid_x, grid_y, grid_z, stream, function, *args):
        """The C launch, as a no-op that counts (both tritons pass the function handle fifth)."""
        self.launches[self._names[function]] += 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Inside the block the C launch is a C no-op (``"".format`` of its arguments): timed calls pay no Python
        frame for it."""
        self.launch.__setstate__(("".format, (), {}, None))
        try:
            yield
        finally:
            self.launch.__setstate__((self.count, (), {}, None))

    def reset(self) -> None:
        self.launches.clear()


class _FakeUtils:
    """Triton's C utilities (``CudaUtils``) without libcuda."""

    def __init__(self, gpu: FakeGpu):
        self.load_binary = gpu.load_binary
        self.launch = gpu.launch
        self.get_device_properties = lambda device: dict(TRITON_PROPERTIES)
        self.get_current_device = int
        self.set_current_device = lambda device: None
        self.get_device_capability = lambda device: (H200.major, H200.minor)
        self.get_default_stream = lambda device: 0
        self.is_stream_capturing = lambda stream: False
        self.build_signature_metadata = tuple
        self.unload_module = lambda module: None
        self.set_printf_fifo_size = lambda size: None
        self.cuOccupancyMaxActiveClusters = lambda *args: 1

    def __getattr__(self, name: str):  # host-side TMA descriptors and the like: not used by the package
        raise NotImplementedError(f"the fake GPU has no triton utility {name!r}")


def _patch(stack: contextlib.ExitStack, target: Any, name: str, value: Any) -> None:
    stack.enter_context(mock.patch.object(target, name, value, create=True))


def _exchange_device(device: int) -> int:  # torch.cuda's wrapper in a CUDA build, over the patched C entry
    if device < 0:
        return -1
    return torch._C._cuda_exchangeDevice(device)


def _maybe_exchange_device(device: int) -> int:
    if device < 0:
        return -1
    return torch._C._cuda_maybeExchangeDevice(device)


def _patch_torch_cuda(stack: contextlib.ExitStack) -> None:
    c = torch._C
    for name, value in (("_cuda_getCurrentRawStream", operator.index), ("_cuda_getDevice", int),
                        ("_cuda_exchangeDevice", operator.index), ("_cuda_maybeExchangeDevice", operator.index),
                        ("_cuda_isCurrentStreamCapturing", bool)):
        _patch(stack, c, name, value)
    cuda = torch.cuda
    if not torch.backends.cuda.is_built():  # a CPU build's stubs raise; a CUDA build's wrappers call the C entries
        _patch(stack, cuda, "_exchange_device", _exchange_device)
        _patch(stack, cuda, "_maybe_exchange_device", _maybe_exchange_device)
    _patch(stack, cuda, "_initialized", True)  # _lazy_init returns at once, as after a GPU's first call
    _patch(stack, cuda, "_is_in_bad_fork", bool)  # a C entry in a CUDA build (a Python lambda in a CPU build)
    _patch(stack, torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", bool)
    _patch(stack, cuda, "get_device_properties", lambda device=None: H200)
    _patch(stack, cuda, "get_device_name", lambda device=None: H200.name)
    _patch(stack, cuda, "device_count", lambda: 1)


def _cuda_device(device: Any) -> Any:
    return CUDA0 if isinstance(device, torch.device) and device.type == "meta" else device


def _on_cuda(fn: Callable) -> Callable:
    """``fn`` with a meta device first argument read as cuda:0; cached where ``fn`` is."""
    if hasattr(fn, "cache_info"):
        return functools.cache(lambda device, *args: fn(_cuda_device(device), *args))

    def wrapped(device, *args, **kwargs):
        return fn(CUDA0 if device.type == "meta" else device, *args, **kwargs)

    wrapped.__name__ = wrapped.__qualname__ = getattr(fn, "__name__", "wrapped")
    return wrapped


def _rebind(stack: contextlib.ExitStack, original: Any, replacement: Any) -> None:
    """Replace ``original`` wherever a module of the package holds it (``from ._common import name`` copies)."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fused_residual"):
            for name, value in list(vars(module).items()):
                if value is original:
                    _patch(stack, module, name, replacement)


def device_facts() -> dict[str, Callable]:
    """The functions of ``kernels/_common.py`` that answer for a device: defined there, first parameter ``device``."""
    from fused_residual.kernels import _common

    found = {}
    for name, fn in vars(_common).items():
        if callable(fn) and getattr(fn, "__module__", None) == _common.__name__ and not isinstance(fn, type):
            parameters = list(inspect.signature(fn).parameters)
            if parameters[:1] == ["device"]:
                found[name] = fn
    return found


def _same_answer(fn: Callable) -> bool:
    try:
        return fn(torch.device("meta")) == fn(CUDA0)
    except Exception:
        return False


def _patch_device_facts(stack: contextlib.ExitStack) -> None:
    for real in device_facts().values():
        if hasattr(real, "cache_clear"):  # forget the H200's answers for cuda:0 after the block
            stack.callback(real.cache_clear)
        if not _same_answer(real):
            _rebind(stack, real, _on_cuda(real))


def _temporary_patches(stack: contextlib.ExitStack) -> list[str]:
    """TEMPORARY: package code that still tests ``device.type == "cuda"`` outside ``kernels/_common.py``. Each patch
    applies only while that test is there (and the function it patches exists); delete this function once none
    applies. Returns what was patched."""
    import importlib

    from fused_residual.activations import REFERENCE_FORM

    applied = []
    triton_backend = importlib.import_module("fused_residual.backends.triton_backend")
    unavailable = getattr(triton_backend, "unavailable", None)
    if unavailable is not None and unavailable(torch.device("meta"), torch.bfloat16, REFERENCE_FORM) is not None:
        _rebind(stack, unavailable, _on_cuda(unavailable))
        applied.append("backends.triton_backend.unavailable")
    reduce = importlib.import_module("fused_residual.kernels._reduce")
    counters = getattr(reduce, "arrival_counters", None)
    if counters is not None and 'device.type == "cuda"' in inspect.getsource(counters):
        # The CUDA branch keys its zeroed counters on (type, index, stream) and allocates on the device: seed the
        # key of cuda:0's stream 0 with meta counters, and hand it cuda:0 for meta.
        _patch(stack, reduce, "_COUNTERS", {**reduce._COUNTERS, ("cuda", 0, 0): torch.zeros(
            1 << 20, dtype=torch.int32, device="meta")})
        _rebind(stack, counters, _on_cuda(counters))
        applied.append("kernels._reduce.arrival_counters")
    return applied


def _patch_triton(stack: contextlib.ExitStack, gpu: FakeGpu) -> None:
    import triton
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    if hasattr(nvidia, "make_launcher"):  # triton 3.6: a C launcher module generated and compiled per kernel
        _patch(stack, nvidia, "library_dirs", lambda: [])
        _patch(stack, nvidia, "compile_module_from_src", lambda **kwargs: types.SimpleNamespace(launch=gpu.launch))
    else:  # triton 3.9: one native launcher, utils.launch, fed argument annotations made in Python
        _patch(stack, nvidia, "PyKernelArg", lambda nested_tuple, type: (type, nested_tuple))
        for value, name in enumerate(("ARG_CONSTEXPR", "ARG_KERNEL", "ARG_TUPLE")):
            _patch(stack, nvidia, name, value)
    _patch(stack, nvidia.CudaUtils, "instance", _FakeUtils(gpu))  # CudaUtils() returns it and compiles nothing
    _patch(stack, driver, "_active", nvidia.CudaDriver())  # built after torch.cuda is patched: it copies entries

    def first_candidate(self, *args, config, **meta):
        rank = float(self.configs.index(config))
        return [rank, rank, rank]

    _patch(stack, Autotuner, "_bench", first_candidate)
    # The package's allocator of Triton's global scratch allocates on the current GPU: meta here.
    from fused_residual.kernels import _common, _tma

    _patch(stack, _common, "current_gpu", lambda: META)
    stack.callback(_tma._SCRATCH.clear)
    assert triton.runtime.driver.active.get_current_target().arch == 90


@contextlib.contextmanager
def fake_gpu() -> Iterator[FakeGpu]:
    """Inside the block the package's Triton routes run on meta tensors as on an H200 (module docstring)."""
    from fused_residual.kernels import _common
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = [f"{module.__name__}.{name}" for module in list(sys.modules.values())
                   if getattr(module, "__name__", "").startswith("fused_residual.kernels")
                   for name, value in vars(module).items() if isinstance(value, InterpretedFunction)]
    if _common.interpreter_enabled() or interpreted:
        raise RuntimeError("fake_gpu() needs compiled Triton kernels: start the process without TRITON_INTERPRET "
                           f"(interpreted: {interpreted[:2]})")
    gpu = FakeGpu()
    with contextlib.ExitStack() as stack:
        _patch_torch_cuda(stack)
        _patch_triton(stack, gpu)
        _patch_device_facts(stack)
        gpu.temporary = _temporary_patches(stack)
        family = _common.family(torch.device("meta"))
        assert family.name == "hopper" and not family.hip, f"the fake H200 reads as {family}"
        yield gpu


# The library holding the Python meta kernels prefer_cpp_meta_kernels keeps (a Library unregisters its kernels when
# collected).
_KEPT_META_LIBRARIES: list[Any] = []


def _meta_key(op: torch._ops.OpOverload) -> str:
    """The key ``torch.library.Library.impl`` records for ``op``'s Meta kernel."""
    schema = op._schema
    overload = f".{schema.overload_name}" if schema.overload_name else ""
    return f"{op.namespace}/{schema.name.split('::')[-1]}{overload}/Meta"


def prefer_cpp_meta_kernels() -> list[str]:
    """Unregister PyTorch's Python meta kernels wherever a C++ kernel serves meta tensors (a meta kernel or a C++
    composite); returns the ops whose meta kernel is now C++.

    ``torch._meta_registrations`` registers Python meta kernels over many ops that have C++ ones (a Python meta
    ``addmm`` costs hundreds of microseconds, the C++ one about one), also over ops that a C++ op calls inside
    (``ones_like`` -> ``empty_like``): on meta tensors a block would measure them. Its library can only be reset as
    a whole, so the kernels it held for other ops are registered again, unchanged, in a library kept for the life
    of the process. Process-wide and not undone: call it in a process of its own. Idempotent.
    """
    from torch import _meta_registrations as registrations
    from torch._decomp import global_decomposition_table

    if _KEPT_META_LIBRARIES:
        return _KEPT_META_LIBRARIES[0].dropped
    lib = registrations._meta_lib_dont_use_me_use_register_meta
    table: dict[torch._ops.OpOverload, Callable] = {}
    for kind in ("meta", "post_autograd", "pre_autograd"):  # activate_meta's precedence
        for op, fn in global_decomposition_table[kind].items():
            if isinstance(op, torch._ops.OpOverload):
                table.setdefault(op, fn)
    registered = {_meta_key(op): (op, fn) for op, fn in table.items() if _meta_key(op) in lib._op_impls}
    if registered.keys() != lib._op_impls:
        missing = sorted(lib._op_impls - registered.keys())
        raise RuntimeError(f"cannot re-register every Python meta kernel (e.g. {missing[:3]}): leaving them all")
    lib.m.reset()
    kept = torch.library.Library("aten", "IMPL", "Meta")
    kept.dropped = []
    _KEPT_META_LIBRARIES.append(kept)
    for _, (op, fn) in sorted(registered.items()):
        if torch._C._dispatch_has_computed_kernel_for_dispatch_key(op.name(), "Meta"):
            kept.dropped.append(str(op))
        else:
            kept.impl(op, fn)
    return kept.dropped
