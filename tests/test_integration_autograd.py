"""Autograd machinery around the block: activation checkpointing, saved-tensor hooks, inference_mode.

Backends: ``torch`` everywhere and ``triton`` (the interpreter on CPU, float32). Expected values come from the
reference in float64 (``conftest.float64_reference``).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from conftest import HAS_CUDA, assert_close, backend_choices, float64_reference, run_with_grads
from torch.utils.checkpoint import checkpoint

import fused_residual as fr

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = backend_choices()


class CheckpointedNet(torch.nn.Module):
    """A FusedResidualNet whose blocks run under non-reentrant activation checkpointing."""

    def __init__(self, net: fr.FusedResidualNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        x = torch.relu(self.net.linear1(x))
        for block in self.net.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.net.linear2(x)


@contextlib.contextmanager
def counting_block_forwards():
    """Counts the forwards of the block's Functions inside the block (whichever backend computes them, planned or
    not: ``ResidualBlockFunction`` and the cached training call's ``PlannedBlockFunction``), by their frames."""
    calls: list = []
    names = ("ResidualBlockFunction.forward", "_planned_function.<locals>.PlannedBlockFunction.forward")

    def profile(frame, event, arg):  # (the planned forward hands a non-2-D x to the other: counted once)
        if event == "call" and frame.f_code.co_qualname in names and frame.f_back.f_code.co_qualname != names[1]:
            calls.append(frame.f_code.co_qualname)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_gives_the_same_gradients_and_recomputes_the_forward(use_backend, monkeypatch, backend):
    use_backend(backend)
    torch.manual_seed(0)
    net = fr.FusedResidualNet(5, 16, 3, 3, device=DEVICE)
    x, dout = torch.randn(10, 5, device=DEVICE), torch.randn(10, 3, device=DEVICE)
    expected, expected_grads = float64_reference(net, x, dout)
    plain_out, plain_grads = run_with_grads(net, x, dout)
    net.zero_grad()

    with counting_block_forwards() as calls:
        out, grads = run_with_grads(CheckpointedNet(net), x, dout)
    assert len(calls) == 2 * len(net.blocks), "each block runs again in backward"
    torch.testing.assert_close(out, plain_out)
    assert_close(out, expected, "out", scale=2)
    for name, grad in grads.items():
        name = name.removeprefix("net.")
        torch.testing.assert_close(grad, plain_grads[name], msg=name)
        assert_close(grad, expected_grads[name], f"grad {name}", scale=8)


def test_checkpointing_inside_torch_compile():
    torch.manual_seed(1)
    net = fr.FusedResidualNet(5, 16, 3, 2)
    x, dout = torch.randn(6, 5), torch.randn(6, 3)
    expected, expected_grads = float64_reference(net, x, dout)
    checkpointed = CheckpointedNet(net)
    compiled = torch.compile(checkpointed, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_(True)
    out = compiled(xr)
    out.backward(dout)
    assert_close(out, expected, "out", scale=2)
    assert_close(xr.grad, expected_grads["x"], "grad x", scale=8)
    for name, p in net.named_parameters():
        assert_close(p.grad, expected_grads[name], f"grad {name}", scale=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_go_through_saved_tensor_hooks(use_backend, backend):
    """Every tensor the block keeps is packed by the hooks and backward uses what unpack returns."""
    use_backend(backend)
    torch.manual_seed(2)
    block = fr.FusedResidualBlock(12, 12, device=DEVICE)
    x, dout = torch.randn(7, 12, device=DEVICE), torch.randn(7, 12, device=DEVICE)
    expected, expected_grads = float64_reference(block, x, dout)
    packed, unpacked = [], []

    def pack(t):  # keep a copy: backward must see only what unpack hands back
        packed.append(t)
        return t.clone()

    def unpack(copy):
        unpacked.append(copy)
        return copy

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out, grads = run_with_grads(block, x, dout)
    # x, h, out, W1, b1, W2: b1 because x is kept, so a double backward computes h again from x, W1 and b1 (the
    # shortcut weight is None without a projection; no backward reads b2).
    assert len(packed) == len(unpacked) == 6
    assert sorted(tuple(t.shape) for t in packed) == [(7, 12)] * 3 + [(12,)] + [(12, 12)] * 2
    assert any(t is block.linear1.bias for t in packed) and not any(t is block.linear2.bias for t in packed)
    assert_close(out, expected, "out")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"grad {name}", scale=4)


def test_save_on_cpu_gives_the_same_gradients():
    torch.manual_seed(3)
    net = fr.FusedResidualNet(5, 16, 3, 2, device=DEVICE)
    x, dout = torch.randn(8, 5, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    plain_out, plain_grads = run_with_grads(net, x, dout)
    net.zero_grad()
    with torch.autograd.graph.save_on_cpu(pin_memory=HAS_CUDA):
        out, grads = run_with_grads(net, x, dout)
    torch.testing.assert_close(out, plain_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_saves_nothing_and_matches_no_grad(use_backend, backend):
    use_backend(backend)
    torch.manual_seed(4)
    net = fr.FusedResidualNet(5, 16, 3, 2, device=DEVICE)
    x = torch.randn(9, 5, device=DEVICE)
    expected, _ = float64_reference(net, x, torch.zeros(9, 3, device=DEVICE))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.inference_mode():
            out = net(x)
        with torch.no_grad():
            no_grad_out = net(x)
    assert packed == []
    assert out.is_inference() and not out.requires_grad
    torch.testing.assert_close(out, no_grad_out, rtol=0, atol=0)
    assert_close(out, expected, "inference out", scale=2)


def test_parametrized_weights_are_the_ones_used():
    """A parametrization (here weight normalization) replaces nn.Linear's weight attribute: the block must read
    the attribute, not the raw parameter, and the gradients must reach the parametrization's parameters."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(5)
    reference, fused = fr.ResidualBlock(8, 8), fr.FusedResidualBlock(8, 8)
    fused.load_state_dict(reference.state_dict())
    weight_norm(reference.linear1)
    weight_norm(fused.linear1)
    with torch.no_grad():  # a weight that differs from the raw one it started from
        reference.linear1.parametrizations.weight.original0.mul_(2)
        fused.linear1.parametrizations.weight.original0.mul_(2)
    x, dout = torch.randn(5, 8), torch.randn(5, 8)
    expected, expected_grads = run_with_grads(reference, x, dout)
    out, grads = run_with_grads(fused, x, dout)
    torch.testing.assert_close(out, expected)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)
