"""What Triton's interpreter (``TRITON_INTERPRET=1``, the Triton kernels on CPU tensors) cannot do, and how the
package keeps that from going silently wrong: bfloat16 is refused, launches from several threads are serialised."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TRITON_INSTALLED, assert_close
from fused_residual.kernels._common import interpreter_enabled

import fused_residual as fr

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(not TRITON_INSTALLED or torch.cuda.is_available() or not interpreter_enabled(),
                                 reason="needs triton's interpreter on a machine without CUDA")]


def block_math64(block: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor):
    """Output and gradients (x, then linear1.weight) of the reference block's math in float64, plain ops."""
    w1 = block.linear1.weight.detach().double().requires_grad_(True)
    b1, w2, b2 = (t.detach().double() for t in (block.linear1.bias, block.linear2.weight, block.linear2.bias))
    x64 = x.detach().double().requires_grad_(True)
    out = torch.relu(torch.relu(x64 @ w1.t() + b1) @ w2.t() + b2 + x64)
    out.backward(dout.double())
    return out.detach(), x64.grad, w1.grad


@pytest.mark.parametrize("choice", ["triton", "triton:two_gemm"])
def test_forced_triton_refuses_bfloat16_on_the_interpreter(use_backend, choice):
    use_backend(choice)
    block = fr.FusedResidualBlock(16, 16, dtype=torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"forced.*bfloat16.*interpreter"):
            block(x.requires_grad_(grad))


def test_forced_triton_refuses_cpu_autocast_bfloat16_on_the_interpreter(use_backend):
    use_backend("triton")
    block = fr.FusedResidualBlock(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=r"bfloat16.*interpreter"):
        block(torch.randn(8, 16, requires_grad=True))


def test_auto_never_takes_triton_for_bfloat16_on_the_cpu(use_backend):
    use_backend("auto")
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(16, 16, dtype=torch.bfloat16)
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    expected = block_math64(block, x, torch.ones(8, 16))[0]
    assert_close(block(x), expected, "out", dtype=torch.bfloat16, scale=2)


@pytest.mark.parametrize("choice", ["triton", "triton:two_gemm"])
def test_interpreted_launches_from_several_threads_give_the_right_results(use_backend, choice):
    """Three threads train one block at once (whole-block and two-GEMM kernels, split-K reductions with arrival
    counters): every output and gradient is right and nothing raises."""
    use_backend(choice)
    torch.manual_seed(1)
    width, rows = 16, 37
    block = fr.FusedResidualBlock(width, width)
    failures: list[str] = []
    start = threading.Barrier(3)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start.wait()
        for step in range(4):
            x = torch.randn(rows, width, generator=g).requires_grad_(True)
            dout = torch.randn(rows, width, generator=g)
            try:
                out = block(x)
                dx, dw1 = torch.autograd.grad(out, (x, block.linear1.weight), dout)
                want, want_dx, want_dw1 = block_math64(block, x, dout)
                for name, got, expected in (("out", out, want), ("dx", dx, want_dx), ("dw1", dw1, want_dw1)):
                    assert_close(got, expected, f"thread {seed} step {step} {name}", scale=8)
            except Exception as e:  # collected: an exception in a thread would not fail the test
                failures.append(f"thread {seed} step {step}: {type(e).__name__}: {str(e)[:300]}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, "\n".join(failures)


def test_a_launch_that_dies_midway_leaves_no_stale_arrival_counters(monkeypatch):
    """An interpreted launch stopped after some of its programs arrived (an exception, Ctrl-C) must not leave the
    arrival counters set: the next launch in the thread would take an early program for the last one."""
    from fused_residual.kernels import fused_linear as fl
    from triton.runtime import interpreter

    g = torch.Generator().manual_seed(2)
    grad, a = torch.randn(700, 40, generator=g), torch.randn(700, 24, generator=g)
    expected = grad.double().t() @ a.double()
    real = interpreter.InterpreterBuilder.set_grid_idx
    programs = []

    def stop_at_the_third_program(self, x, y, z):
        programs.append((x, y, z))
        if len(programs) == 3:
            raise KeyboardInterrupt
        return real(self, x, y, z)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", stop_at_the_third_program)
    with pytest.raises(KeyboardInterrupt):
        fl.fused_linear(grad.t(), a, rowsum=True, split_k=9)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", real)
    dw, db = fl.fused_linear(grad.t(), a, rowsum=True, split_k=9)
    assert_close(dw, expected, "dW after an interrupted launch", scale=16)
    assert_close(db, grad.double().sum(0), "db after an interrupted launch", scale=16)
