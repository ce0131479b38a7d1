"""Every activation x final activation x path, against float64 math written here: output and every gradient.

Forms: the hidden activation of the registry (relu, gelu, gelu_tanh, silu) x the final activation (ReLU, the seed
block; None, the transformer FFN ``x + linear2(act(linear1(x)))``). Shapes: square (the whole-block kernels take
it with a ReLU hidden activation), the FFN's hidden = 4 x width (two-GEMM only), and a projection shortcut.
Paths: ``triton`` (whole block where it fits, else two GEMMs), ``triton:two_gemm``, and the ``torch`` backend, the
semantic reference. Dtypes: float32 and float16 (the interpreter has no bfloat16).

In float16 a ReLU input within rounding of 0 may land on either side; within ``RELU_TIE_BAND`` the expectation
follows the decision the kernels made (read from their own saved ``h`` and ``out``, as ``conftest.block_reference``
does). Smooth activations have no such jump.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, RELU_TIE_BAND, assert_close

import fused_residual as fr
from fused_residual import backends, dispatch
from fused_residual.activations import ACTIVATIONS, FINAL_ACTIVATIONS, NAMES, Form

DEVICE = "cuda" if HAS_CUDA else "cpu"
PATHS = ["torch"] + (["triton", "triton:two_gemm"] if backends.missing_requirement("triton") is None else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
SHAPES = {"square": (12, 12, 12, False), "ffn": (12, 48, 12, True), "projection": (12, 20, 20, True)}


def make_block(shape: str, activation: str, final: str | None, dtype: torch.dtype) -> fr.FusedResidualBlock:
    n_in, hidden, n_out, _ = SHAPES[shape]
    torch.manual_seed(hash((shape, activation, final)) % 1000)
    block = fr.FusedResidualBlock(n_in, n_out, hidden_features=hidden, activation=activation, final_activation=final,
                                  projection=shape == "projection", device=DEVICE)
    return block.to(dtype)


def reference(block: fr.FusedResidualBlock, x: torch.Tensor, dout: torch.Tensor, form: Form):
    """float64 (out, grads by name) of ``final(linear2(act(linear1(x))) + shortcut(x))``; ReLU decisions within the
    tie band follow the kernels' own (read from the route's forward at the block's dtype)."""
    params = dict(block.named_parameters())
    w1, w2, ws = params["linear1.weight"], params["linear2.weight"], params.get("shortcut.weight")
    band = RELU_TIE_BAND[x.dtype]
    with torch.no_grad():
        chosen = dispatch.route(x, w1, ws, form, True)
        backend = chosen.backend or backends.get("torch")
        variant = dispatch.kernel_variants(chosen, x, w1, ws, form, None)[0]
        out_lp, saved_lp = backend.block_forward(x, w1, params["linear1.bias"], w2, params["linear2.bias"], ws, form,
                                                 save=True, variant=variant)
    p64 = {name: t.detach().double().requires_grad_(True) for name, t in params.items()}
    x64 = x.detach().double().requires_grad_(True)
    pre = x64 @ p64["linear1.weight"].t() + p64["linear1.bias"]
    if form.activation == "relu":
        h = pre * torch.where(pre.abs() <= band, saved_lp.double() > 0, pre > 0)
    else:
        h = ACTIVATIONS[form.activation].forward(pre)
    shortcut = x64 @ p64["shortcut.weight"].t() if ws is not None else x64
    y = h @ p64["linear2.weight"].t() + p64["linear2.bias"] + shortcut
    if form.final_activation == "relu":
        y = y * torch.where(y.abs() <= band, out_lp.double() > 0, y > 0)
    y.backward(dout.double())
    return y.detach(), {"x": x64.grad, **{name: t.grad for name, t in p64.items()}}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.replace(":", "-"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("final", FINAL_ACTIVATIONS, ids=lambda f: f"final_{f}")
@pytest.mark.parametrize("activation", NAMES)
def test_every_form_on_every_path(use_backend, activation, final, shape, path, dtype):
    if dtype != torch.float32 and path == "torch" and DEVICE == "cpu":
        pytest.skip("float16 on the CPU is checked on the Triton paths, as in test_parity")
    use_backend(path)
    form = Form(activation, final)
    block = make_block(shape, activation, final, dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(19, block.in_features, generator=g).to(DEVICE, dtype).requires_grad_(True)
    dout = torch.randn(19, block.out_features, generator=g).to(DEVICE, dtype)
    out = block(x)
    assert out.dtype == dtype
    out.backward(dout)
    expected, expected_grads = reference(block, x.detach(), dout, form)
    scale = max(1.0, SHAPES[shape][1] / 16) ** 0.5
    assert_close(out, expected, "out", scale=2 * scale)
    grads = {"x": x.grad, **{name: p.grad for name, p in block.named_parameters()}}
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert_close(grad, expected_grads[name], f"grad {name}", scale=8 * scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation,final,shape,forward,backward", [
    ("relu", "relu", "square", "whole_block_forward_kernel", "whole_block_backward_kernel"),
    ("relu", None, "square", "whole_block_forward_kernel", "whole_block_backward_kernel"),
    ("gelu", None, "square", "fused_linear_kernel", "fused_linear_kernel"),
    ("silu", None, "ffn", "fused_linear_kernel", "fused_linear_kernel"),
])
def test_which_kernels_take_each_form(use_backend, activation, final, shape, forward, backward):
    """The whole-block kernels take a square block with a ReLU hidden activation and either final activation;
    smooth activations and other shapes take the two-GEMM kernels (2 + 4 launches)."""
    if backends.missing_requirement("triton") is not None:
        pytest.skip("triton is not installed")
    from fused_residual.kernels._launch import count_launches

    use_backend("triton")
    block = make_block(shape, activation, final, torch.float32)
    x = torch.randn(9, block.in_features, device=DEVICE, requires_grad=True)
    with count_launches() as launches:
        out = block(x)
    assert dict(launches) == {forward: 1 if forward.startswith("whole") else 2}
    with count_launches() as launches:
        out.sum().backward()
    assert dict(launches) == {backward: 1 if backward.startswith("whole") else 4}


@pytest.mark.interpreter
@pytest.mark.parametrize("activation,shape", [("relu", "square"), ("gelu", "ffn"), ("silu", "projection")])
def test_ffn_form_under_autocast_promotes_and_adds_x_unrounded(use_backend, activation, shape):
    """The FFN form ``x + ffn(x)`` under autocast promotes to x's dtype (float32), as the reference written out of
    place does; the Triton kernels read x once, in float32, and add it un-rounded (x near 100: a float16-rounded x
    would be off by up to 0.03). A projection shortcut is a linear: its output stays in the autocast dtype."""
    if backends.missing_requirement("triton") is not None:
        pytest.skip("triton is not installed")
    use_backend("triton")
    block = make_block(shape, activation, None, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = (100 + torch.rand(21, block.in_features, generator=g)).to(DEVICE).requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = block(x)
    projection = shape == "projection"
    assert out.dtype == (torch.float16 if projection else torch.float32)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, out.dtype)
    out.backward(dout)
    assert x.grad.dtype == torch.float32 and block.linear1.weight.grad.dtype == torch.float32
    # Exact math with the linears' operands rounded to float16, as autocast rounds them; x itself un-rounded.
    lo = lambda t: t.detach().half().double()  # noqa: E731
    pre = lo(x) @ lo(block.linear1.weight).t() + lo(block.linear1.bias)
    h = lo(ACTIVATIONS[activation].forward(pre))
    y = h @ lo(block.linear2.weight).t() + lo(block.linear2.bias)
    y = y + (lo(x) @ lo(block.shortcut.weight).t() if projection else x.detach().double())
    assert_close(out, y, "out", dtype=torch.float16 if projection else torch.float32,
                 scale=1 if projection else 20)
