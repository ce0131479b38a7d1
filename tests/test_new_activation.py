"""Adding an activation is a registry entry plus its Triton function and derivative: checked with one registered at
test time that the package has never seen, squared ReLU (``relu(x)^2``, derivative ``2 relu(x)``).

The registry entry (torch function, derivative, facts) is added for the test. Its Triton functions join the kernels'
switches (``apply`` and ``gradient`` in ``kernels/activations.py``) the one way a test can: switches with one more
branch that defer to the library's, put in their place in the kernel modules' globals. Triton's interpreter reads
those globals at each launch, so the interpreter runs the real kernels on it; a compiled kernel needs the branch in
the library's switches themselves, so on a GPU (and ahead of time) the Triton paths are not run here, and what is
checked ahead of time is that the compile list takes the new activation up.

Everything else follows the entry: what the kernels keep for the backward (``from_output`` False: the
pre-activation), the tiles pruning offers (register class "light": every tile, and the whole-block kernels), the
package's forms, export and double backward. The parity, export and double-backward tests are the suite's own
(each iterates over the registry), run here on the new entry.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_INSTALLED, assert_close

import fused_residual as fr
from fused_residual.activations import ACTIVATIONS, FINAL_ACTIVATIONS, Activation, Form

# Deprecations inside torch's own export code (as in test_export); not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")]

NAME = "relu_squared"
ENTRY = Activation(NAME, lambda t: torch.relu(t).square(), lambda t: t.relu_().square_(),
                   lambda g, pre: g * 2 * torch.relu(pre), from_output=False, piecewise_linear=False,
                   register_class="light")
INTERPRETED = TRITON_INSTALLED and not torch.cuda.is_available()  # conftest turns the interpreter on without CUDA

if INTERPRETED:
    import triton
    import triton.language as tl
    from fused_residual.kernels import activations as kernel_activations

    library_apply, library_gradient = kernel_activations.apply, kernel_activations.gradient

    @triton.jit
    def relu_squared(x):
        r = tl.where(x < 0, 0.0, x)
        return r * r

    @triton.jit
    def relu_squared_gradient(grad, pre):
        pre = pre.to(tl.float32)
        return grad * 2.0 * tl.where(pre < 0, 0.0, pre)

    @triton.jit
    def apply_with_relu_squared(x, ACTIVATION: tl.constexpr):
        if ACTIVATION == "relu_squared":
            return relu_squared(x)
        else:
            return library_apply(x, ACTIVATION)

    @triton.jit
    def gradient_with_relu_squared(grad, saved, ACTIVATION: tl.constexpr):
        if ACTIVATION == "relu_squared":
            return relu_squared_gradient(grad, saved)
        else:
            return library_gradient(grad, saved, ACTIVATION)


@pytest.fixture
def registered(monkeypatch):
    """Squared ReLU in the registry and, under the interpreter, in the kernels' switches, for one test."""
    monkeypatch.setitem(ACTIVATIONS, NAME, ENTRY)
    if INTERPRETED:
        import importlib
        import pkgutil

        import fused_residual.kernels as kernels

        switches = {library_apply: apply_with_relu_squared, library_gradient: gradient_with_relu_squared}
        # Every kernel module imported first: one imported while a switch is replaced would keep the replacement.
        modules = [importlib.import_module(f"fused_residual.kernels.{info.name}")
                   for info in pkgutil.iter_modules(kernels.__path__)]
        patched = 0
        for module in modules:
            for name, value in list(vars(module).items()):
                if any(value is switch for switch in switches):
                    monkeypatch.setattr(module, name, switches[value])
                    patched += 1
        assert patched >= 4, "the kernel modules no longer call the switches by these names"


def triton_paths_here(path: str) -> None:
    if path.startswith("triton") and not INTERPRETED:
        pytest.skip("the Triton functions join the kernels only under the interpreter (see the module docstring)")


def test_the_registry_takes_it_and_refuses_unknown_facts(registered):
    block = fr.FusedResidualBlock(8, 8, activation=NAME)
    assert block.form == Form(NAME, "relu")
    with pytest.raises(ValueError, match="register_class"):
        Activation("x", torch.relu, torch.relu_, lambda g, out: g, from_output=True, piecewise_linear=True,
                   register_class="medium")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("path", ["torch", "triton", "triton:two_gemm"], ids=lambda p: p.replace(":", "-"))
@pytest.mark.parametrize("shape", ["square", "ffn", "projection"])
@pytest.mark.parametrize("final", FINAL_ACTIVATIONS, ids=lambda f: f"final_{f}")
def test_parity_on_every_path(registered, use_backend, final, shape, path, dtype):
    """The parity test of every form (``test_parity_forms``): output and every gradient against float64 math."""
    triton_paths_here(path)
    from test_parity_forms import test_every_form_on_every_path as every_form_on_every_path

    every_form_on_every_path(use_backend, NAME, final, shape, path, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("final", FINAL_ACTIVATIONS, ids=lambda f: f"final_{f}")
@pytest.mark.parametrize("variant,forward,backward", [
    ("triton", {"whole_block_forward_kernel": 1}, {"whole_block_backward_kernel": 1}),
    ("triton:two_gemm", {"fused_linear_kernel": 2}, {"fused_linear_kernel": 4}),
])
def test_a_light_activation_takes_the_whole_block_kernels(registered, use_backend, final, variant, forward, backward):
    """Its register class sends it to the whole-block kernels (one launch each way) where the shape fits, as ReLU;
    the two-GEMM kernels keep its pre-activation and apply it on B's load for dW2."""
    triton_paths_here(variant)
    from fused_residual.kernels._launch import count_launches

    use_backend(variant)
    block = fr.FusedResidualBlock(16, 16, activation=NAME, final_activation=final)
    x = torch.randn(9, 16, requires_grad=True)
    with count_launches() as launches:
        out = block(x)
    assert dict(launches) == forward
    with count_launches() as launches:
        out.sum().backward()
    assert dict(launches) == backward


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_kernel_epilogues_gates_and_b_operands(registered, dtype):
    """The fused-linear kernel test of every activation (``test_kernels_interpreter``): act(acc) with the
    pre-activation stored, the gate acc * act'(pre), act on B's load, against the entry in float64."""
    triton_paths_here("triton")
    from test_kernels_interpreter import test_activation_epilogues_gates_and_b_operands as kernel_test

    kernel_test(dtype, NAME, 17, 48, 130)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "default"])
@pytest.mark.parametrize("final", FINAL_ACTIVATIONS, ids=lambda f: f"final_{f}")
def test_export(registered, final, strict):
    """The export test of every form (``test_export``): an aten-only graph that computes the block."""
    from test_export import export_form

    export_form(Form(NAME, final), strict)


def test_onnx_export_runs_in_onnxruntime(registered, tmp_path):
    from test_export import block_math, block_operands, onnx_session, run_session

    torch.manual_seed(5)
    block = fr.FusedResidualBlock(8, 8, hidden_features=32, activation=NAME, final_activation=None).eval()
    session = onnx_session(block, torch.randn(4, 8), tmp_path / "relu_squared.onnx", dynamic_batch=False)
    x = torch.randn(4, 8)
    assert_close(run_session(session, x), block_math(x, *block_operands(block), block.form), "onnx out", scale=4)


@pytest.mark.parametrize("final", FINAL_ACTIVATIONS, ids=lambda f: f"final_{f}")
def test_double_backward(registered, use_backend, final):
    """Not piecewise linear: the double-backward test of curved activations (``test_double_backward``)."""
    from test_double_backward import test_double_backward_of_curved_activations_matches_autograd as curved

    curved(use_backend, NAME, final)


def test_the_ahead_of_time_compile_list_takes_it_up(registered):
    """What ``tests/aot_compile.py`` would compile for it: the fused-linear launches that compute it (epilogue with
    the pre-activation stored, gate, B's load) with every tile of a light activation, and the whole-block kernels."""
    import aot_compile
    from fused_residual.kernels import fused_linear_configs

    assert fused_linear_configs.heavy_places(NAME, NAME, NAME) == ()
    variants = {name: flags for name, flags, *_ in aot_compile.activation_variants()}
    assert variants[f"forward_{NAME}"] == {"HAS_BIAS": True, "ACTIVATION": NAME, "STORE_PRE": True}
    assert {f"backward_gate_{NAME}", f"weight_grad_{NAME}_on_b"} <= set(variants)
    cases = {(c["kernel"], c["variant"]) for c in aot_compile.fused_linear_cases() if NAME in c["variant"]}
    assert ("fused_linear", f"weight_grad_{NAME}_on_b") in cases
    block = [c for c in aot_compile.whole_block_cases() if c["flags"]["ACTIVATION"] == NAME]
    assert {c["kernel"] for c in block} == {"whole_block_forward", "whole_block_backward"}
    assert all(not c["flags"]["FROM_OUTPUT"] and c["variant"].endswith(f"-{NAME}") for c in block)
