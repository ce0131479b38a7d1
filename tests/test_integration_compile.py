"""torch.compile and torch.library: the registered ops pass opcheck, and compiled models match eager.

Compiled runs are compared with the reference in float64 (the code under test never computes the expected
values). Most cases compile with ``aot_eager`` (Dynamo + AOTAutograd, the parts that see our ops, without
Inductor's C++ build); one CPU case and the CUDA cases go through Inductor. Shapes are few and small: each
distinct shape is a compilation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close, backend_choices, device_params, float64_reference

import fused_residual as fr
from fused_residual import ops, saving
from fused_residual.activations import REFERENCE_FORM

# The device of the backend-parametrized tests: CUDA where there is one, else the CPU, where the Triton kernels
# run in the interpreter (conftest sets TRITON_INTERPRET=1 there).
DEVICE = "cuda" if HAS_CUDA else "cpu"
# The torch backend everywhere; the Triton kernels too where they can run (here: the interpreter, float32).
BACKENDS = backend_choices()

# opcheck's schema test goes through a deprecated torch.jit helper in recent PyTorch; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

BLOCK_OPS = (torch.ops.fused_residual.block_forward.default, torch.ops.fused_residual.block_backward.default)
LINEAR_OPS = (torch.ops.fused_residual.linear_residual_relu_forward.default,
              torch.ops.fused_residual.linear_residual_relu_backward.default)


def graph_recorder(graphs: list):
    """A torch.compile backend that runs like aot_eager and keeps the forward and backward FX graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def called_ops(graphs) -> set:
    return {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def compiled_run(model: torch.nn.Module, compiled, x: torch.Tensor, dout: torch.Tensor):
    """Output and gradients (input, then ``model``'s parameters by name) of ``compiled`` (which wraps ``model``)."""
    xr = x.detach().clone().requires_grad_(True)
    out = compiled(xr)
    out.backward(dout)
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out.detach(), grads


def assert_matches_reference(model, compiled, x, dout, scale=2.0):
    expected, expected_grads = float64_reference(model, x, dout)
    out, grads = compiled_run(model, compiled, x, dout)
    assert out.dtype == x.dtype
    assert_close(out, expected, "compiled out", scale=scale)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"compiled grad {name}", scale=4 * scale)


def make_block_inputs(rows=7, in_features=6, features=6, projection=False, bias=True, requires_grad=True,
                      device=DEVICE, dtype=torch.float32):
    torch.manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    return (make(rows, in_features), make(features, in_features), make(features) if bias else None,
            make(features, features), make(features) if bias else None,
            make(features, in_features) if projection else None)


# ---- torch.library.opcheck -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["bias", "no_bias", "projection", "input_only", "weights_only"])
def test_opcheck_block_ops(use_backend, backend, variant):
    use_backend(backend)
    x, w1, b1, w2, b2, ws = make_block_inputs(in_features=4 if variant == "projection" else 6,
                                              projection=variant == "projection", bias=variant != "no_bias")
    if variant == "input_only":
        w1, b1, w2, b2 = (t.detach() for t in (w1, b1, w2, b2))
    if variant == "weights_only":
        x = x.detach()
    # The default mode (the hidden layer kept), a recompute block (its sign bits), one whose output is kept anyway.
    modes = ((saving.DEFAULT, True, False), (saving.RECOMPUTE, False, True), (saving.RECOMPUTE_OUT_KEPT, False, False))
    for mode in modes:
        torch.library.opcheck(BLOCK_OPS[0], (x, w1, b1, w2, b2, ws, *REFERENCE_FORM, *mode))
    # The backward op alone, for each set of gradients autograd may ask for.
    plain = [t if t is None else t.detach() for t in (x, w1, b1, w2, b2, ws)]
    out, h = ops.block_forward(*plain, *REFERENCE_FORM, *modes[0])
    _, bits = ops.block_forward(*plain, *REFERENCE_FORM, *modes[1])
    dout = torch.randn_like(out)
    x, w1, b1, w2, _, ws = plain
    for needs in ([True] * 5 + [ws is not None], [True, False, False, False, False, False],
                  [False, True, False, True, True, False]):
        torch.library.opcheck(BLOCK_OPS[1], (dout, x, h, out, w1, w2, ws, None, None, *REFERENCE_FORM, needs, x.dtype))
        # A recompute block: x, b1 and the packed sign bits (or out) instead of h and out.
        torch.library.opcheck(BLOCK_OPS[1],
                              (dout, x, None, None, w1, w2, ws, b1, bits, *REFERENCE_FORM, needs, x.dtype))
        torch.library.opcheck(BLOCK_OPS[1], (dout, x, None, out, w1, w2, ws, b1, None, *REFERENCE_FORM, needs, x.dtype))
    # A column-major gradient from downstream: the gradients still come out row-major, as the fake says.
    torch.library.opcheck(BLOCK_OPS[1], (dout.t().contiguous().t(), x, h, out, w1, w2, ws, None, None, *REFERENCE_FORM,
                                         [True] * 5 + [ws is not None], x.dtype))
    # x is not saved when no weight gradient needs it: the op takes None there.
    torch.library.opcheck(BLOCK_OPS[1], (dout, None, h, out, w1, w2, ws, None, None, *REFERENCE_FORM,
                                         [True, False, False, True, True, False], x.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_single_layer_ops(use_backend, backend):
    use_backend(backend)
    torch.manual_seed(0)
    h, w, b, r = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((5, 4), (6, 4), (6,), (5, 6)))
    torch.library.opcheck(LINEAR_OPS[0], (h, w, b, r))
    torch.library.opcheck(LINEAR_OPS[0], (h, w, None, r.detach()))
    out = ops.linear_residual_relu_forward(h.detach(), w.detach(), b.detach(), r.detach())
    for needs in ([True, True, True, True], [False, True, False, False]):
        torch.library.opcheck(LINEAR_OPS[1], (torch.randn_like(out), h.detach(), out, w.detach(), needs, h.dtype))
    column_major = torch.randn_like(out).t().contiguous().t()
    torch.library.opcheck(LINEAR_OPS[1], (column_major, h.detach(), out, w.detach(), [True, True, True, True],
                                          h.dtype))


def test_op_schemas_take_no_float_scalars():
    # A Python float reaching a Triton kernel through a traced graph is typed fp64. These ops take none: the
    # Triton backend launches its kernels itself, with its own argument types, in eager and compiled runs.
    for op in (*BLOCK_OPS, *LINEAR_OPS):
        assert all(arg.type.kind() != "FloatType" for arg in op._schema.arguments), op._schema


# ---- compiled models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_net_has_our_ops_in_one_graph_and_matches_eager(use_backend, backend):
    use_backend(backend)
    torch.manual_seed(1)
    net = fr.FusedResidualNet(5, 16, 3, 2, device=DEVICE)
    graphs: list = []
    compiled = torch.compile(net, fullgraph=True, backend=graph_recorder(graphs))  # fullgraph: a break raises
    assert_matches_reference(net, compiled, torch.randn(9, 5, device=DEVICE), torch.randn(9, 3, device=DEVICE))
    assert len(graphs) == 2, "one forward and one backward graph"
    assert set(BLOCK_OPS) <= called_ops(graphs)
    forward_ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert forward_ops.count(BLOCK_OPS[0]) == 2


def test_compiled_projection_block_and_leading_dims_match_the_reference():
    torch.manual_seed(2)
    block = fr.FusedResidualBlock(6, 10, projection=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_matches_reference(block, compiled, torch.randn(2, 3, 6), torch.randn(2, 3, 10))


def test_compiled_single_layer_op_matches_its_definition(use_backend):
    use_backend("torch")
    torch.manual_seed(3)
    inputs = [torch.randn(*s, requires_grad=True) for s in ((2, 5, 8), (6, 8), (6,), (2, 5, 6))]
    dout = torch.randn(2, 5, 6)
    graphs: list = []
    compiled = torch.compile(fr.functional.linear_residual_relu, fullgraph=True, backend=graph_recorder(graphs))
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = torch.relu(exact[0] @ exact[1].t() + exact[2] + exact[3])
    expected_grads = torch.autograd.grad(expected, exact, dout.double())
    assert_close(out, expected, "out")
    for name, g, e in zip("hwbr", grads, expected_grads, strict=True):
        assert_close(g, e, f"grad {name}", scale=4)
    assert set(LINEAR_OPS) <= called_ops(graphs)


def test_compiled_inference_under_no_grad_and_inference_mode():
    torch.manual_seed(4)
    net = fr.FusedResidualNet(5, 16, 3, 2)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 5)
    expected, _ = float64_reference(net, x, torch.zeros(6, 3))
    with torch.no_grad():
        assert_close(compiled(x), expected, "no_grad out", scale=2)
    with torch.inference_mode():
        out = compiled(x)
    assert out.is_inference()
    assert_close(out, expected, "inference_mode out", scale=2)


def test_dynamic_batch_size_compiles_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(5)
    net = fr.FusedResidualNet(5, 16, 3, 1)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, fullgraph=True, dynamic=True, backend=counter)
    for rows in (6, 11, 3):
        assert_matches_reference(net, compiled, torch.randn(rows, 5), torch.randn(rows, 3))
        net.zero_grad()
    assert counter.frame_count == 1


@pytest.mark.parametrize("choice", ["auto", "composite"])
def test_where_no_kernel_of_ours_can_run_the_compiler_sees_the_composite(use_backend, choice):
    """On the CPU ``auto`` never takes the Triton kernels: the compiled graph holds the reference's own aten ops,
    which the compiler fuses as it fuses the reference, and none of ours."""
    use_backend(choice)
    torch.manual_seed(11)
    net = fr.FusedResidualNet(5, 16, 3, 2)
    graphs: list = []
    compiled = torch.compile(net, fullgraph=True, backend=graph_recorder(graphs))
    assert_matches_reference(net, compiled, torch.randn(9, 5), torch.randn(9, 3))
    targets = {str(t) for t in called_ops(graphs)}
    assert not {t for t in targets if t.startswith("fused_residual")}, targets
    assert "aten.addmm.default" in targets or "aten.mm.default" in targets


def test_backend_is_chosen_at_run_time_not_baked_into_the_graph(use_backend, monkeypatch):
    """Where a graph holds our ops (traced with a backend forced), the backend they run is chosen at run time.
    Whether it holds our ops or the composite is decided when it is traced: compile afresh."""
    torch._dynamo.reset()
    use_backend("torch")
    block = fr.FusedResidualBlock(8, 8)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8)
    compiled(x)
    use_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="forced"):
        compiled(x)


def test_fuse_then_compile_matches_the_reference_model():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 12), fr.ResidualBlock(12, 12), torch.nn.ReLU(),
                                fr.ResidualBlock(12, 12))
    x, dout = torch.randn(5, 4), torch.randn(5, 12)
    expected, expected_grads = float64_reference(model, x, dout)
    fr.fuse(model)
    out, grads = compiled_run(model, torch.compile(model, fullgraph=True, backend="aot_eager"), x, dout)
    assert_close(out, expected, "out", scale=2)
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], f"grad {name}", scale=8)


@pytest.mark.parametrize("device", device_params())
def test_inductor_compiles_forward_and_backward(device):
    """The real thing: Inductor's generated code around our ops (C++ on CPU, Triton on CUDA)."""
    torch.manual_seed(8)
    net = fr.FusedResidualNet(5, 16, 3, 2, device=device)
    compiled = torch.compile(net, fullgraph=True)
    assert_matches_reference(net, compiled, torch.randn(9, 5, device=device), torch.randn(9, 3, device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inductor_on_cuda_in_half_precision_matches_eager(dtype):
    torch.manual_seed(9)
    net = fr.FusedResidualNet(64, 128, 32, 2, device="cuda", dtype=dtype)
    x = torch.randn(256, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net, fullgraph=True)(x)
    expected, _ = float64_reference(net, x, torch.zeros(256, 32, device="cuda"))
    assert compiled.dtype == dtype
    assert_close(compiled, expected, "compiled out", scale=4)
    assert_close(compiled, eager.double(), "compiled vs eager", scale=4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("choice", ["auto", "triton", "triton:two_gemm", "torch"])
@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
def test_reduce_overhead_captures_cuda_graphs_with_no_host_sync(use_backend, choice, training):
    """torch.compile(mode="reduce-overhead") records CUDA graphs around our ops: no op may sync with the host or
    be skipped by cudagraph trees, and replays must give the eager results."""
    from torch._dynamo.utils import counters

    use_backend(choice)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(10)
    net = fr.FusedResidualNet(64, 64, 32, 2, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(net, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=training)
    for step in range(4):  # warm-up, record, then replays
        if step == 3:
            torch.cuda.set_sync_debug_mode("error")  # a host sync in a replayed step raises
        try:
            out = compiled(x)
            if training:
                out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    with torch.no_grad():
        torch.testing.assert_close(out.detach().float(), net(x.detach()).float(), atol=5e-2, rtol=5e-2)
