"""Host-side helpers shared by the kernel wrappers: interpreter and device facts, launch device, TF32 policy,
autotune-key buckets. Imports no triton at import time (``fused_residual.dispatch`` imports it).

The device facts are read here and nowhere else: whether a device runs compiled Triton kernels (``is_gpu``), its
family (``family``: which config tables, limits and schedules its kernels take), capability, SMs and shared
memory, the device to launch on and where launch scratch goes. Callers read them through this module at call time
(``_common.family(device)``), and the facts here go through ``is_gpu``, so that replacing one attribute of this
module (a host-time benchmark makes meta tensors take the GPU branch) reaches every kernel wrapper.

A device's family is decided once, here (``family``): AMD first, from ``torch.version.hip`` or Triton's active
target and the device's gfx architecture (under ROCm the device type is ``cuda`` and the capability is a made-up
pair: an MI250X reads (9, 0), like an H100), then NVIDIA by the exact compute capability, never by its major
number alone. A device of no family below (sm_75, RDNA, a capability newer than this code) gets ``OTHER``, the
most conservative tables, with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import NamedTuple

import torch


def is_gpu(device: torch.device) -> bool:
    """Whether ``device`` runs compiled Triton kernels: the one test of it in the package (a CUDA device today)."""
    return device.type == "cuda"


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``): the one place that reads it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_interpreter(device: torch.device) -> bool:
    """Kernels on CPU tensors run in Triton's interpreter (decided when the kernels were decorated)."""
    return device.type == "cpu" and interpreter_enabled()


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a GPU ``device`` (the one place that reads it); (9, 0) for the interpreter, whose
    kernels take the Hopper limits."""
    return torch.cuda.get_device_capability(device) if is_gpu(device) else (9, 0)


class Family(NamedTuple):
    """GPUs whose kernels share config tables, limits and schedules (the tables are keyed by ``name``)."""

    name: str
    targets: tuple[str, ...]  # the compile targets it stands for: "sm_86", "gfx942"
    shared_memory: int  # opt-in shared memory (LDS on AMD) per block, bytes: what its tables are sized for
    mma: str  # the matrix instruction a 16-bit tl.dot compiles to there ("" where unknown)
    tma: bool  # tensor memory accelerator copies (device-side descriptors)
    tf32: bool  # tl.dot takes input_precision="tf32"
    hip: bool  # AMD (ROCm): Triton's own launcher, not the CUDA one


FAMILIES = {f.name: f for f in (
    Family("ampere", ("sm_80",), 166912, "mma.sync", False, True, False),
    Family("consumer", ("sm_86", "sm_89"), 101376, "mma.sync", False, True, False),
    Family("hopper", ("sm_90",), 232448, "wgmma", True, True, False),
    Family("blackwell", ("sm_100", "sm_103"), 232448, "tcgen05", True, True, False),
    Family("blackwell_consumer", ("sm_120", "sm_121"), 101376, "mma.sync", True, True, False),
    Family("cdna2", ("gfx90a",), 65536, "v_mfma", False, False, True),
    Family("cdna3", ("gfx942",), 65536, "v_mfma", False, True, True),
    Family("cdna4", ("gfx950",), 163840, "v_mfma", False, False, True),
)}
# Anything else: small classic tiles only (48 KB, the shared memory every CUDA and HIP device gives a block without
# opting in), no TMA, IEEE fp32 dots; ``auto`` never picks the kernels there (fused_residual.dispatch).
OTHER = Family("other", (), 49152, "", False, False, False)
# The interpreter's kernels take Hopper's tables and limits (they only key the autotuners there: it runs fixed
# small configs).
INTERPRETER_FAMILY = FAMILIES["hopper"]
TARGET_FAMILY = {target: f for f in FAMILIES.values() for target in f.targets}
_warned: set[str] = set()


@functools.cache
def family(device: torch.device) -> Family:
    """The family of a GPU ``device`` (module docstring): AMD by its gfx architecture, NVIDIA by its exact compute
    capability; ``OTHER`` with one warning per architecture for anything else."""
    if not is_gpu(device):
        return INTERPRETER_FAMILY
    arch = hip_arch(device)
    if arch is None:
        major, minor = capability(device)
        arch = f"sm_{major}{minor}"
    found = TARGET_FAMILY.get(arch)
    if found is None:
        found = OTHER._replace(hip=arch.startswith("gfx"))
        if arch not in _warned:
            _warned.add(arch)
            warnings.warn(f"fused_residual: no kernel tables for {arch} ({_device_name(device)}): the Triton kernels "
                          "take their most conservative configs there, and `auto` the torch backend", stacklevel=2)
    return found


def hip_arch(device: torch.device) -> str | None:
    """The gfx architecture of an AMD GPU ``device`` ("gfx942"), or None on NVIDIA: ROCm's torch says so
    (``torch.version.hip``), else Triton's active target does."""
    if torch.version.hip:
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or _triton_arch("hip")
        return (arch or "gfx?").split(":")[0]
    return _triton_arch("hip")


def _triton_arch(backend: str) -> str | None:
    """The architecture of Triton's active target if its backend is ``backend``, else None (also without a driver)."""
    try:
        import triton  # here, not at the top: this module imports no triton

        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # no triton, no active driver (a CPU-only machine)
        return None
    return str(target.arch).split(":")[0] if target.backend == backend else None


def _device_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:
        return str(device)


@functools.cache
def max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per block of a GPU ``device``, in bytes; the interpreter has no limit that matters."""
    if not is_gpu(device):
        return 1 << 30
    import triton  # here, not at the top: this module imports no triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (multi-GPU safe)."""
    return torch.cuda.device(device) if is_gpu(device) else contextlib.nullcontext()


_CURRENT_GPU = torch.device("cuda")  # no index: whichever GPU is current (``launch_device`` sets it)


def current_gpu() -> torch.device:
    """Where memory that Triton asks for during a launch goes (the TMA descriptors' scratch): the current GPU,
    which ``launch_device`` has made the tensors' one."""
    return _CURRENT_GPU


def current_device_reader(get_current_device):
    """What a replay calls for the current device: a Triton driver's ``get_current_device``, or the C function it
    calls where that is provably the same answer. Triton's driver under torch takes ``torch.cuda.current_device``,
    which is ``_lazy_init()`` (it returns at once once CUDA is initialized) and ``torch._C._cuda_getDevice()``:
    three Python frames fewer per replay."""
    cuda, direct = torch.cuda, getattr(torch._C, "_cuda_getDevice", None)
    code = getattr(get_current_device, "__code__", None)
    if (direct is not None and get_current_device is cuda.current_device and cuda.is_initialized()
            and code is not None and code.co_names == ("_lazy_init", "torch", "_C", "_cuda_getDevice")):
        return direct
    return get_current_device


def capture_check():
    """What a replay calls to ask whether the current stream is capturing a CUDA graph:
    ``torch.cuda.is_current_stream_capturing``, or the C function that is its whole body (no Python frame)."""
    check = torch.cuda.is_current_stream_capturing
    code = getattr(check, "__code__", None)
    if code is not None and code.co_names == ("_cuda_isCurrentStreamCapturing",):
        direct = check.__globals__.get("_cuda_isCurrentStreamCapturing")
        if callable(direct):
            return direct
    return check


def input_precision(t: torch.Tensor) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 inputs only where PyTorch's own matmuls may use it and the
    family's Triton backend takes it (not gfx90a or gfx950: IEEE there)."""
    if t.dtype == torch.float32 and is_gpu(t.device) and torch.backends.cuda.matmul.allow_tf32 and \
            family(t.device).tf32:
        return "tf32"
    return "ieee"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """SMs of ``device``, cached: launch grids read it on every call. The interpreter pretends 2, so that
    persistent loops run several tiles."""
    return torch.cuda.get_device_properties(device).multi_processor_count if is_gpu(device) else 2
