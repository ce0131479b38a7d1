"""Deployment: torch.export gives an aten-only graph of the block (dispatch sends export tracing to composite.py)
that computes every form, ONNX models of it run in onnxruntime, AOTInductor packages of it run, and torch.compile
still keeps the custom ops.

Expected values are float64 computations of the block's definition (``block_math`` here, or conftest's
``float64_reference``); the code under test never computes them. The ONNX tests skip where onnx, onnxscript or
onnxruntime is missing (they are in the ``test`` extras, so CI runs them).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import HAS_CUDA, assert_close, device_params, float64_reference
from torch import nn

import fused_residual as fr
from fused_residual.activations import ACTIVATIONS, FINAL_ACTIVATIONS, Form

# Deprecations inside torch's own export code; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")]

FORMS = [Form(activation, final) for activation in ACTIVATIONS for final in FINAL_ACTIVATIONS]


def block_math(x, w1, b1, w2, b2, ws, form: Form):
    """``final(act(x W1^T + b1) W2^T + b2 + shortcut)`` in float64, ``act`` the registry's torch function."""
    x, w1, b1, w2, b2, ws = (None if t is None else t.double() for t in (x, w1, b1, w2, b2, ws))
    y = ACTIVATIONS[form.activation].forward(x @ w1.T + b1) @ w2.T + b2 + (x if ws is None else x @ ws.T)
    return y if form.final_activation is None else torch.relu(y)


def block_operands(block: fr.FusedResidualBlock):
    return (block.linear1.weight, block.linear1.bias, block.linear2.weight, block.linear2.bias,
            None if block.shortcut is None else block.shortcut.weight)


def fused_targets(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "fused_residual" in str(n.target)}


def assert_aten_only(graph: torch.fx.Graph) -> None:
    import operator

    for node in graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            assert isinstance(node.target, torch._ops.OpOverload), node.target
            assert node.target.namespace == "aten", node.target


# ---- the models ----------------------------------------------------------------------------------------------

def make_net() -> nn.Module:
    torch.manual_seed(0)
    return fr.FusedResidualNet(5, 16, 3, 2).eval()


def make_sequential() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 12), fr.ResidualBlock(12, 12), nn.ReLU(), fr.ResidualBlock(12, 12),
                          nn.Linear(12, 3))
    model = fr.fuse(model).eval()
    assert isinstance(model[1], fr.FusedResidualBlock) and isinstance(model[3], fr.FusedResidualBlock)
    return model


def make_projection() -> nn.Module:
    torch.manual_seed(2)
    return fr.FusedResidualBlock(6, 10, projection=True).eval()


MODELS = {"net": (make_net, 5), "fused_sequential": (make_sequential, 4), "projection": (make_projection, 6)}
BATCH = torch.export.Dim("batch")


def expected_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    expected, _ = float64_reference(model, x, torch.zeros(*x.shape[:-1], model(x).shape[-1]))
    return expected


# ---- torch.export --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_export_and_run_decompositions_give_aten_only_graphs(name):
    make, features = MODELS[name]
    model = make()
    x = torch.randn(7, features)
    exported = torch.export.export(model, (x,))
    assert not fused_targets(exported.graph)
    decomposed = exported.run_decompositions()
    assert not fused_targets(decomposed.graph)
    assert_aten_only(decomposed.graph)
    assert_close(decomposed.module()(x), expected_output(model, x), "decomposed out", scale=2)


def export_form(form: Form, strict: bool) -> None:
    """A block of ``form`` exported (Dynamo's strict tracing, or the default) to aten ops that compute it."""
    torch.manual_seed(3)
    block = fr.FusedResidualBlock(8, 8, hidden_features=24, activation=form.activation,
                                  final_activation=form.final_activation).eval()
    x = torch.randn(2, 5, 8)  # leading dims are kept
    decomposed = torch.export.export(block, (x,), strict=strict).run_decompositions()
    assert_aten_only(decomposed.graph)
    out = decomposed.module()(x)
    assert_close(out, block_math(x, *block_operands(block), form), "exported out", scale=4)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "default"])
@pytest.mark.parametrize("form", FORMS, ids=[f"{f.activation}-{f.final_activation}" for f in FORMS])
def test_every_form_exports_to_aten_ops_that_compute_it(form, strict):
    export_form(form, strict)


@pytest.mark.parametrize("final_activation", ["relu", None])
def test_export_under_autocast_keeps_the_blocks_dtypes(final_activation):
    torch.manual_seed(4)
    block = fr.FusedResidualBlock(16, 16, final_activation=final_activation).eval()
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exported = torch.export.export(block, (x,))
        eager = block(x)
    assert not fused_targets(exported.graph)
    out = exported.module()(x)
    # The reference form keeps the autocast dtype, as fr.ResidualBlock's in-place `out += x` does; the FFN form
    # promotes to x's dtype (README, "Autocast").
    assert out.dtype == eager.dtype == (torch.bfloat16 if final_activation else torch.float32)
    w1, b1, w2, b2, _ = (None if t is None else t.to(torch.bfloat16) for t in block_operands(block))
    assert_close(out, block_math(x.to(torch.bfloat16), w1, b1, w2, b2, None, block.form), "autocast out",
                 dtype=torch.bfloat16, scale=2)


def test_exported_program_loads_and_runs_without_this_package(tmp_path):
    model = make_net()
    x = torch.randn(6, 5)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "net.pt2")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "ep = torch.export.load(sys.argv[1] + '/net.pt2')\n"
            "torch.save(ep.module()(torch.load(sys.argv[1] + '/x.pt')), sys.argv[1] + '/y.pt')\n"
            "assert not [m for m in sys.modules if m.startswith('fused_residual')]\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(torch.load(tmp_path / "y.pt"), expected_output(model, x), "loaded out", scale=2)


def test_compile_still_runs_the_ops_after_an_export(use_backend):
    """Export routes the block to aten ops; torch.compile in the same process still keeps the custom ops (where a
    backend of ours may run: forced here, since on the CPU ``auto`` compiles the composite)."""
    use_backend("torch")
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model, x = make_net(), torch.randn(4, 5)
    torch.export.export(model, (x,))
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(x)
    assert "fused_residual.block_forward.default" in set().union(*(fused_targets(g.graph) for g in graphs))


# ---- ONNX ------------------------------------------------------------------------------------------------------

def onnx_session(model: nn.Module, x: torch.Tensor, path, dynamic_batch: bool = True):
    """``model`` exported to ONNX at ``path`` and loaded in onnxruntime; skips where the packages are missing."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    dynamic_shapes = ({0: BATCH},) if dynamic_batch else None
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    proto = onnx.load(str(path))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}, "only standard ONNX operators"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime_at_any_batch_size(name, tmp_path):
    make, features = MODELS[name]
    model = make()
    session = onnx_session(model, torch.randn(4, features), tmp_path / f"{name}.onnx")
    for rows in (3, 17):  # neither is the batch size it was exported with
        x = torch.randn(rows, features)
        out = run_session(session, x)
        assert out.shape == (rows, model(x).shape[-1])
        assert_close(out, expected_output(model, x), f"onnxruntime out, batch {rows}", scale=2)


def test_onnx_export_of_the_ffn_form(tmp_path):
    torch.manual_seed(5)
    block = fr.FusedResidualBlock(8, 8, hidden_features=32, activation="gelu", final_activation=None).eval()
    session = onnx_session(block, torch.randn(4, 8), tmp_path / "ffn.onnx", dynamic_batch=False)
    x = torch.randn(4, 8)
    assert_close(run_session(session, x), block_math(x, *block_operands(block), block.form), "ffn out", scale=4)


# ---- AOTInductor ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", device_params())
def test_aoti_package_runs_at_any_batch_size_and_holds_no_call_into_this_package(device, tmp_path):
    """CPU: Inductor's C++; CUDA: Inductor's own Triton kernels (ours are not in the package: README, Deploying)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(6)
    model = fr.FusedResidualNet(32, 64, 8, 2, device=device, dtype=dtype).eval()
    exported = torch.export.export(model, (torch.randn(16, 32, device=device, dtype=dtype),),
                                   dynamic_shapes=({0: BATCH},))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "net.pt2"))
    with zipfile.ZipFile(path) as package:  # no extern call back into our Python ops: self-contained
        assert not [n for n in package.namelist() if b"fused_residual" in package.read(n)]
    loaded = torch._inductor.aoti_load_package(path)
    for rows in (5, 300):
        x = torch.randn(rows, 32, device=device, dtype=dtype)
        with torch.no_grad():
            out, eager = loaded(x), model(x)  # eager: our kernels where the dispatch picks them
        assert out.dtype == dtype and out.shape == (rows, 8)
        expected = expected_output(model, x)
        assert_close(out, expected, f"aoti out, batch {rows}", scale=4)
        assert_close(eager, expected, f"eager out, batch {rows}", scale=4)


def our_triton_kernel_names() -> set[str]:
    """The names of the Triton kernels in fused_residual.kernels (the ``@triton.jit`` functions it launches)."""
    import importlib
    import pkgutil

    import fused_residual.kernels as kernels

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fused_residual.kernels.{info.name}")
        names |= {name for name, obj in vars(module).items()
                  if name.endswith("_kernel") and type(obj).__module__.startswith("triton")}
    return names


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_aoti_package_on_cuda_runs_inductors_kernels_not_ours(tmp_path, use_backend):
    """The exported graph has no fused op, so the package's kernels are Inductor's: none of ours is named in it,
    and forcing our Triton backend in the loading process changes nothing about what the package computes."""
    torch.manual_seed(7)
    model = fr.FusedResidualNet(64, 128, 32, 2, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    exported = torch.export.export(model, (x,))
    assert not fused_targets(exported.graph)
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "net.pt2"))
    ours = our_triton_kernel_names()
    assert ours, "found no Triton kernels in fused_residual.kernels"
    with zipfile.ZipFile(path) as package:
        contents = {n: package.read(n) for n in package.namelist()}
    assert not [n for n, data in contents.items() if b"fused_residual" in data]
    assert not [(n, k) for n, data in contents.items() for k in ours if k.encode() in data]
    loaded = torch._inductor.aoti_load_package(path)
    out = loaded(x)
    assert_close(out, expected_output(model, x), "aoti cuda out", scale=4)
    use_backend("triton")
    assert torch.equal(loaded(x), out)
