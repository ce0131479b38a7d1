"""``torch.compile`` of the fused net against ``torch.compile`` of the reference net, side by side (one
pytest-benchmark group): a training step (forward, then backward of a fixed ``dout``) of a 4-block net of width 256
on 4096 rows, float32, on the CPU.

Where the route is not a Triton kernel (on the CPU ``auto`` never takes one), the compiled fused net holds the plain
composite, which Inductor fuses as it fuses the reference; the compiled-fused / compiled-reference ratio should be
1 within noise. Run it timed with ``python -m pytest benchmarks/test_compile.py --benchmark-only``; untimed (the
default) it compiles and checks a small net once.
"""

from __future__ import annotations

import pytest
import torch

import fused_residual as fr

from .conftest import _timing_enabled

# torch.compile's imports touch torch.jit.script_method, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

TIMED = (4096, 256, 4)  # rows, width, blocks
SMOKE = (64, 32, 2)


@pytest.mark.parametrize("impl", ["compile-reference", "compile-fused"])
def test_compiled_net_training_step(impl, benchmark, request, monkeypatch):
    monkeypatch.delenv(fr.BACKEND_ENV_VAR, raising=False)  # auto, as users run it
    rows, width, blocks = TIMED if _timing_enabled(request.config) else SMOKE
    benchmark.group = f"cpu fp32 train net {blocks}x{rows}x{width} torch.compile"
    torch.manual_seed(0)
    reference = fr.ResidualNet(width, width, width, blocks)
    fused = fr.FusedResidualNet(width, width, width, blocks)
    fused.load_state_dict(reference.state_dict())
    model = reference if impl == "compile-reference" else fused
    torch._dynamo.reset()
    compiled = torch.compile(model)
    x, dout = torch.randn(rows, width, requires_grad=True), torch.randn(rows, width)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = compiled(x)
        out.backward(dout)
        return out

    out = step()  # compiles
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-4)
    benchmark(step)
