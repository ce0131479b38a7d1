"""Host-side helpers shared by the kernel wrappers: interpreter and device facts, launch device, TF32 policy,
autotune-key buckets. Imports no triton (``fused_residual.dispatch`` imports it).

The device facts are read here and nowhere else: whether a device runs compiled Triton kernels (``is_gpu``), its
capability, SMs and shared memory, the device to launch on and where launch scratch goes. Callers read them
through this module at call time (``_common.capability(device)``), and the facts here go through ``is_gpu``, so
that replacing one attribute of this module (a host-time benchmark makes meta tensors take the GPU branch)
reaches every kernel wrapper.
"""

from __future__ import annotations

import contextlib
import functools
import os

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


def input_precision(t: torch.Tensor) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 inputs only where PyTorch's own matmuls may use it."""
    if t.dtype == torch.float32 and is_gpu(t.device) and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """SMs of ``device``, cached: launch grids read it on every call. The interpreter pretends 2, so that
    persistent loops run several tiles."""
    return torch.cuda.get_device_properties(device).multi_processor_count if is_gpu(device) else 2
