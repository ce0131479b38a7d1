"""Counts per cached call, which do not depend on the machine: the package's Python frames, kernel launches and
tensors allocated, for a forward and a training step on both Triton routes.

The cached GPU path is run here without a GPU: the first call of a signature records its steps under Triton's
interpreter; then every recorded launch gets a compiled entry whose launcher does nothing, and Triton's driver
answers for a GPU (current device 0, stream 0), so later calls take exactly the path they take on a GPU, minus the
C launch. Frames are counted with ``sys.setprofile`` (Python frames whose file is under ``fused_residual/`` or
``kernels/``); tensors allocated are the new tensors (not views, not in-place results) of the aten ops a call
makes, counted the same way for the reference block.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from types import SimpleNamespace

import pytest
import torch
from conftest import TRITON_INSTALLED
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual as fr
from fused_residual import plans

pytestmark = [pytest.mark.interpreter, pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")]

if TRITON_INSTALLED:
    from fused_residual.kernels import _launch, _plan

PACKAGE_DIRS = tuple(os.path.dirname(p) + os.sep for p in (fr.__file__, _plan.__file__)) if TRITON_INSTALLED else ()

# Per cached call (the targets): package frames, and tensors allocated no more than the reference block's.
FRAMES = {("whole_block", "forward"): 20, ("whole_block", "train"): 80,
          ("two_gemm", "forward"): 30, ("two_gemm", "train"): 120}
LAUNCHES = {("whole_block", "forward"): {"whole_block_forward_kernel": 1},
            ("whole_block", "train"): {"whole_block_forward_kernel": 1, "whole_block_backward_kernel": 1},
            ("two_gemm", "forward"): {"fused_linear_kernel": 2},
            ("two_gemm", "train"): {"fused_linear_kernel": 6}}


class Allocations(TorchDispatchMode):
    """Counts the tensors aten ops create (every return that is not an alias of an input)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += sum(1 for r in func._schema.returns if r.alias_info is None and "Tensor" in str(r.type))
        return func(*args, **(kwargs or {}))


def package_frames(fn) -> int:
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE_DIRS):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@contextlib.contextmanager
def gpu_path_without_a_gpu(monkeypatch):
    """Every recorded launch gets a do-nothing compiled entry, and the steps see a GPU's driver: later calls take
    the GPU's cached path."""
    launched = []

    def launch(*args):  # keeps the package's source files on the stack at each launch (not the generated replay's)
        stack = traceback.extract_stack()
        launched.append([f.filename for f in stack if f.filename.startswith(PACKAGE_DIRS)
                         and not os.path.basename(f.filename).startswith("<")])

    def stub(steps):
        for step in steps:
            if isinstance(step, _plan.PreparedLaunch):
                step.take((launch, None, None, (), dict(step.kwargs)))
            elif isinstance(step, _plan.Family):
                for member in step.members.values():
                    stub(member.steps)

    for entry in plans._plans.values():
        plan = entry.plan if isinstance(entry, plans.Cached) else entry  # a block's plan as stored
        for run in (plan.forward, *plan.backwards.values()):
            if isinstance(run, _plan.Steps):
                stub(run.steps)
                run.gpu = True
    driver = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda index: 0)
    monkeypatch.setattr(_plan, "_driver", SimpleNamespace(active=driver))
    monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", lambda: False)  # a CPU build's raises
    yield launched


def counted(fn) -> tuple[int, dict, int]:
    """(package frames, launches, tensors allocated) of one ``fn()``; none of the launches through Triton's path."""
    frames = package_frames(fn)
    through_triton = sum(_launch.triton_path_counts().values())
    with _launch.count_launches() as launches, Allocations() as allocations:
        fn()
    assert sum(_launch.triton_path_counts().values()) == through_triton
    return frames, dict(launches), allocations.count


@pytest.mark.parametrize("route", ["whole_block", "two_gemm"])
def test_counts_per_cached_call(use_backend, monkeypatch, route):
    use_backend("triton" if route == "whole_block" else "triton:two_gemm")
    monkeypatch.setattr(plans, "ENABLED", True)
    torch.manual_seed(0)
    block, reference = fr.FusedResidualBlock(64, 64), fr.ResidualBlock(64, 64)
    x = torch.randn(64, 64)
    xg = x.clone().requires_grad_(True)

    def forward(module=block):
        with torch.no_grad():
            module(x)

    def train(module=block):
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).sum().backward()

    forward()
    train()  # the first calls record the steps (under the interpreter)
    with gpu_path_without_a_gpu(monkeypatch) as launched:
        for mode, fn in (("forward", forward), ("train", train)):
            fn()  # the first call on the GPU's path writes its steps out (kernels/_replay.py)
            frames, launches, allocations = counted(fn)
            reference_allocations = counted(lambda fn=fn: fn(reference))[2]
            assert launches == LAUNCHES[route, mode]
            assert frames <= FRAMES[route, mode], (mode, frames)
            assert allocations <= reference_allocations, (mode, allocations, reference_allocations)
        assert launched, "the do-nothing launchers ran: the calls took the compiled path"
        # A short hot path: from the module's forward (or the Function's backward) to a launch, 3 files at most.
        for files in launched:
            assert len(set(files)) <= 3, sorted(set(files))
        forward_files = {os.path.basename(f) for f in launched[0]}
        assert forward_files == {"modules.py", "plans.py", "_plan.py"}, forward_files


def test_the_counting_sees_a_change(use_backend, monkeypatch):
    """The frame count is not blind: plans off (the layered path) costs more frames per call."""
    use_backend("torch")
    block = fr.FusedResidualBlock(32, 32)
    x = torch.randn(16, 32)
    with torch.no_grad():
        block(x)
        planned = package_frames(lambda: block(x))
        monkeypatch.setattr(plans, "ENABLED", False)
        layered = package_frames(lambda: block(x))
    assert planned < layered
