"""The one place that decides which backend runs a call: Triton kernels or plain PyTorch.

``FUSED_RESIDUAL_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton for CUDA tensors of float16, bfloat16 or float32 when Triton imports; the torch
  backend everywhere else (CPU tensors, float64: cuBLAS' DGEMM is the right tool there).
- ``triton``: always the Triton kernels. On CPU tensors they run only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter); anywhere they cannot run this raises RuntimeError saying why. Never a silent fallback.
- ``torch``: always the pure-PyTorch backend.

A backend is a module with ``block_forward``, ``block_backward``, ``linear_residual_relu_forward``,
``linear_residual_relu_backward`` and ``linear_relu`` (see ``fallback.py`` for their contracts).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from . import fallback

ENV_VAR = "FUSED_RESIDUAL_BACKEND"
CHOICES = ("auto", "triton", "torch")


_parsed: tuple[str | None, str] = (None, "auto")  # (raw value, choice): parse only when the variable changes


def requested() -> str:
    """The backend asked for by ``FUSED_RESIDUAL_BACKEND`` (validated)."""
    global _parsed
    raw = os.environ.get(ENV_VAR)
    if raw == _parsed[0]:
        return _parsed[1]
    choice = (raw or "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}")
    _parsed = (raw, choice)
    return choice


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_backend() -> ModuleType:
    from . import triton_backend

    return triton_backend


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _why_triton_cannot_run(device: torch.device, dtype: torch.dtype) -> str | None:
    if not triton_available():
        return "the triton package is not installed (pip install triton)"
    if dtype not in TRITON_DTYPES:
        return f"the kernels take float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    if device.type == "cpu":
        return "the tensors are on the CPU; the Triton kernels run there only under TRITON_INTERPRET=1"
    return f"the Triton kernels do not support device type {device.type!r}"


def select(x: torch.Tensor) -> ModuleType:
    """The backend module for a call whose input is ``x`` (its device and dtype decide)."""
    choice = requested()
    if choice == "torch":
        return fallback
    device = x.device
    if choice == "auto":
        if device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_available():
            return _triton_backend()
        return fallback
    why = _why_triton_cannot_run(device, x.dtype)
    if why is not None:
        raise RuntimeError(f"{ENV_VAR}=triton was forced but the Triton backend cannot run: {why}")
    return _triton_backend()


def name_of(backend: ModuleType) -> str:
    return "torch" if backend is fallback else "triton"
