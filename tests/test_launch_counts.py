"""Launches per call on every Triton path: the counts in the README's table, so that a regression fails CI.

Triton launches are counted by the launch counters of ``kernels/_launch.py``. PyTorch work is counted with a
``TorchDispatchMode`` that sees every aten op the call makes outside a Triton launch (inside one, the interpreter
copies tensors with aten ops of its own): everything but allocations and views (which launch nothing) counts.
Each case runs once before it is counted: the first backward that sums across programs zeroes the arrival
counters of its device and stream (``kernels/_reduce.py``), once.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from conftest import HAS_CUDA
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fused_residual as fr
from fused_residual import backends

pytestmark = pytest.mark.interpreter

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _launch  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}  # allocations, no kernel
LINEAR = "fused_linear_kernel"
BLOCK_FORWARD, BLOCK_BACKWARD, NET = ("whole_block_forward_kernel", "whole_block_backward_kernel",
                                      "whole_net_forward_kernel")


class AtenWork(TorchDispatchMode):
    """Counts the aten ops that launch work (not views, not allocations) outside Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (not self.in_launch and not func.is_view and func.overloadpacket.__name__ not in FREE
                and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves((args, kwargs)))):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    """``with counting() as (triton, aten):`` the Triton launches and aten launches made inside the block."""
    mode = AtenWork()
    launch = _launch.CachedLauncher.__call__

    def marked_launch(self, *args, **kwargs):
        mode.in_launch += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            mode.in_launch -= 1

    monkeypatch.setattr(_launch.CachedLauncher, "__call__", marked_launch)

    @contextlib.contextmanager
    def count() -> Iterator[tuple[Counter[str], Counter[str]]]:
        mode.ops = Counter()
        with _launch.count_launches() as triton_launches, mode:
            yield triton_launches, mode.ops

    return count


def training_step(module, x, dout, counting, leaves=()):
    """(forward launches, forward aten ops, backward launches, backward aten ops) of one step, after a warm-up.
    Gradients start unset (``leaves``: tensors other than the module's parameters), as after zero_grad()."""
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        for t in (x, *leaves):
            t.grad = None
        with counting() as (forward, forward_aten):
            out = module(x)
        with counting() as (backward, backward_aten):
            out.backward(dout)
    return dict(forward), dict(forward_aten), dict(backward), dict(backward_aten)


# (backend choice, in, out, projection): Triton launches of (inference forward, training forward, backward)
BLOCK_CASES = {
    "whole_block": ("triton", 12, 12, False, {BLOCK_FORWARD: 1}, {BLOCK_FORWARD: 1}, {BLOCK_BACKWARD: 1}),
    "two_gemm": ("triton:two_gemm", 12, 12, False, {LINEAR: 2}, {LINEAR: 2}, {LINEAR: 4}),
    "whole_block_split_backward": ("triton", 100, 100, False, {BLOCK_FORWARD: 1}, {BLOCK_FORWARD: 1},
                                   {BLOCK_BACKWARD: 1}),
    "whole_block_forward_only": ("triton", 130, 130, False, {BLOCK_FORWARD: 1}, {BLOCK_FORWARD: 1}, {LINEAR: 4}),
    "two_gemm_wide": ("triton", 260, 260, False, {LINEAR: 2}, {LINEAR: 2}, {LINEAR: 4}),
    "projection": ("triton", 12, 20, True, {LINEAR: 2}, {LINEAR: 2}, {LINEAR: 5}),
}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_launches_per_forward_and_training_step(case, use_backend, counting):
    choice, n_in, n_out, projection, inference, forward, backward = BLOCK_CASES[case]
    use_backend(choice)
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(n_in, n_out, projection=projection, device=DEVICE)
    x = torch.randn(9, n_in, device=DEVICE, requires_grad=True)
    dout = torch.randn(9, n_out, device=DEVICE)
    with torch.no_grad(), counting() as (launches, aten):
        block(x)
    assert (dict(launches), dict(aten)) == (inference, {})
    assert training_step(block, x, dout, counting) == (forward, {}, backward, {})


def test_single_layer_launches(use_backend, counting):
    """relu(h W^T + b + r): one launch forward; dh and dW (+ db) one each. The residual's gradient is
    ``dout * (out > 0)`` itself: asked for, it is one aten pass (then the other launches read it unmasked)."""
    use_backend("triton")
    torch.manual_seed(1)
    h = torch.randn(9, 20, device=DEVICE, requires_grad=True)
    w = torch.randn(24, 20, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    dout = torch.randn(9, 24, device=DEVICE)
    for residual_grad, backward_aten in ((False, {}), (True, {"threshold_backward": 1})):
        r = torch.randn(9, 24, device=DEVICE, requires_grad=residual_grad)
        module = torch.nn.Module()
        module.forward = lambda x, r=r: fr.functional.linear_residual_relu(x, w, b, r)
        counts = training_step(module, h, dout, counting, leaves=(w, b, r))
        assert counts == ({LINEAR: 1}, {}, {LINEAR: 2}, backward_aten)


@pytest.mark.parametrize("choice,expected,aten", [("triton", {NET: 1}, {"stack": 4}),
                                                  ("triton:two_gemm", {LINEAR: 6}, {})],
                         ids=["whole_net", "layer_by_layer"])
def test_net_inference_launches(choice, expected, aten, use_backend, counting):
    """Whole net in one launch where the widths fit (its blocks' W1, b1, W2, b2 stacked per call: 4 small copies,
    whatever the number of blocks); forced layer by layer: input layer, 2 per block, output layer."""
    use_backend(choice)
    net = fr.FusedResidualNet(5, 32, 3, 2, device=DEVICE)
    x = torch.randn(9, 5, device=DEVICE)
    with torch.no_grad(), counting() as (launches, aten_ops):
        net(x)
    assert (dict(launches), dict(aten_ops)) == (expected, aten)


@pytest.mark.parametrize("choice,forward,backward",
                         [("triton", {BLOCK_FORWARD: 2}, {BLOCK_BACKWARD: 2}),
                          ("triton:two_gemm", {LINEAR: 4}, {LINEAR: 8})], ids=["whole_block", "two_gemm"])
def test_net_training_launches_are_its_blocks(choice, forward, backward, use_backend, counting):
    """In training the net's blocks run as blocks (their launches as above); its input and output layers are
    PyTorch's own nn.Linear and ReLU."""
    use_backend(choice)
    net = fr.FusedResidualNet(5, 32, 3, 2, device=DEVICE)
    x = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    counts = training_step(net, x, torch.randn(9, 3, device=DEVICE), counting)
    assert (counts[0], counts[2]) == (forward, backward)


@pytest.mark.parametrize("choice,forward,backward",
                         [("triton", {BLOCK_FORWARD: 1}, {BLOCK_BACKWARD: 1}),
                          ("triton:two_gemm", {LINEAR: 2}, {LINEAR: 4})], ids=["whole_block", "two_gemm"])
def test_autocast_reads_x_in_its_own_dtype(choice, forward, backward, use_backend, counting):
    """Under autocast (fp32 x and parameters, fp16 linears) the kernels take x as it is: the only PyTorch work is
    autocast's own casts of the four parameters, and of their gradients back to fp32."""
    use_backend(choice)
    block = fr.FusedResidualBlock(12, 12, device=DEVICE)
    x = torch.randn(9, 12, device=DEVICE, requires_grad=True)
    module = torch.nn.Module()

    def forward_under_autocast(t):
        with torch.autocast(DEVICE, dtype=torch.float16):
            return block(t)

    module.forward = forward_under_autocast
    counts = training_step(module, x, torch.randn(9, 12, device=DEVICE, dtype=torch.float16), counting,
                           leaves=tuple(block.parameters()))
    assert counts == (forward, {"_to_copy": 4}, backward, {"_to_copy": 4})
    assert x.grad.dtype == torch.float32
