"""``recompute=True``: a block keeps its input and its final ReLU's sign bits; ``h`` is recomputed in backward.

Expectations: byte counts worked out by hand, gradients of the block's math written here with plain float64 ops,
the default mode's own gradients, and FLOP and launch counts of the extra work (at most one GEMM per block).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_INSTALLED, assert_close
from torch.utils.flop_counter import FlopCounterMode

import fused_residual as fr
from benchmarks.kept import kept_by_module, kept_for_backward
from fused_residual.activations import ACTIVATIONS

FP32 = 4
ROUTES = ["torch", *(["triton", "triton:two_gemm"] if TRITON_INSTALLED else [])]
FORMS = {
    "reference": {},
    "ffn": {"hidden_features": 64, "activation": "gelu", "final_activation": None},
    "projection": {"projection": True},
    "silu": {"activation": "silu"},
}
# Bytes kept vs the reference modules, one fp32 training step at 4096 x 256, parameters excluded.
TARGETS = {"block": 0.36, "net": 0.62, "ffn": 0.15}


def mask_bytes(rows: int, width: int) -> int:
    """At most: 1 bit per element, each row padded to whole 32-bit words."""
    return rows * -(-width // 32) * 4


def plain_float64(block: fr.FusedResidualBlock, x: torch.Tensor, dout: torch.Tensor):
    """Output and gradients (x, then parameters by name) of the block's math in float64, plain ops."""
    p = {name: t.detach().double().requires_grad_(True) for name, t in block.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    h = ACTIVATIONS[block.activation].forward(F.linear(x64, p["linear1.weight"], p["linear1.bias"]))
    y = F.linear(h, p["linear2.weight"], p["linear2.bias"])
    y = y + (x64 if block.shortcut is None else F.linear(x64, p["shortcut.weight"]))
    out = y if block.final_activation is None else torch.relu(y)
    out.backward(dout.double())
    return out.detach(), {"x": x64.grad, **{name: t.grad for name, t in p.items()}}


def _run(block, x, dout):
    x = x.detach().clone().requires_grad_(True)
    out = block(x)
    out.backward(dout)
    return out.detach(), {"x": x.grad, **{name: t.grad for name, t in block.named_parameters()}}


def _block(form="reference", width=32, recompute=True, **factory):
    torch.manual_seed(0)
    return fr.FusedResidualBlock(width, width, recompute=recompute, **FORMS[form], **factory)


@pytest.mark.parametrize("kind", ["block", "net", "ffn"])
def test_targets_at_4096_by_256(use_backend, kind):
    use_backend("torch")
    rows, width = 4096, 256
    act = rows * width * FP32
    torch.manual_seed(0)
    if kind == "block":
        reference = fr.ResidualBlock(width, width)
        fused = fr.FusedResidualBlock(width, width, recompute=True)
    elif kind == "net":
        reference = fr.ResidualNet(width, width, width, 4)
        fused = fr.FusedResidualNet(width, width, width, 4, recompute=True)
    else:
        reference = fr.FusedResidualBlock(width, width, hidden_features=4 * width, activation="gelu",
                                          final_activation=None)
        fused = fr.FusedResidualBlock(width, width, hidden_features=4 * width, activation="gelu",
                                      final_activation=None, recompute=True)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(rows, width, requires_grad=True)
    _, got = kept_by_module(fused, x)
    if kind == "ffn":  # the eager FFN as users write it: x, gelu's input and output (4x wide)
        ref_bytes = (1 + 2 * 4) * act
    else:
        ref_bytes = kept_by_module(reference, x)[1].nbytes
    assert got.nbytes / ref_bytes <= TARGETS[kind], (got, ref_bytes)
    if kind == "block":  # x and one bit per element
        assert got.nbytes == act + rows * width // 8
        assert set(got.by_dtype) - {"float32"} <= {"uint8", "int32"}
    elif kind == "net":  # x0, a0 and each block's output, kept as the next layer's input: no mask
        assert got.nbytes == (2 + 4) * act and set(got.by_dtype) == {"float32"}
    else:  # x alone
        assert got.nbytes == act


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("width", [32, 20])
def test_a_block_keeps_x_and_packed_sign_bits(use_backend, route, width):
    use_backend(route)
    block = _block(width=width)
    x = torch.randn(48, width, requires_grad=True)
    _, kept = kept_by_module(block, x)
    bits = kept.nbytes - 48 * width * FP32
    assert 0 < bits <= mask_bytes(48, width), kept
    assert kept.storages == 2 and set(kept.by_dtype) - {"float32"} <= {"uint8", "int32"}, kept


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("form", ["ffn", "projection", "silu"])
def test_other_forms_keep_x_and_at_most_the_bits(use_backend, route, form):
    use_backend(route)
    block = _block(form, width=16)
    x = torch.randn(40, 16, requires_grad=True)
    _, kept = kept_by_module(block, x)
    bits = 0 if block.final_activation is None else mask_bytes(40, 16)
    assert 40 * 16 * FP32 <= kept.nbytes <= 40 * 16 * FP32 + bits, kept


# float16 on the kernels (the interpreter without a GPU); the torch route is checked in float32 and float64.
DTYPE_ROUTES = [(torch.float32, r) for r in ROUTES] + [(torch.float16, r) for r in ROUTES if r != "torch"]


@pytest.mark.parametrize("dtype,route", DTYPE_ROUTES)
@pytest.mark.parametrize("form", list(FORMS))
def test_gradients_match_float64_math(use_backend, route, form, dtype):
    use_backend(route)
    block = _block(form, width=16).to(dtype)
    x = torch.randn(24, 16, dtype=dtype)
    dout = torch.randn(24, 16, dtype=dtype)
    out, grads = _run(block, x, dout)
    out64, grads64 = plain_float64(block, x, dout)
    assert_close(out, out64, "out")
    for name, g in grads.items():
        assert_close(g, grads64[name], f"grad {name}", scale=4)


@pytest.mark.parametrize("form", list(FORMS))
def test_float64_on_the_torch_route(use_backend, form):
    use_backend("torch")
    block = _block(form, width=16, dtype=torch.float64)
    x, dout = torch.randn(24, 16, dtype=torch.float64), torch.randn(24, 16, dtype=torch.float64)
    out, grads = _run(block, x, dout)
    out64, grads64 = plain_float64(block, x, dout)
    assert_close(out, out64, "out")
    for name, g in grads.items():
        assert_close(g, grads64[name], f"grad {name}")


@pytest.mark.parametrize("route", ROUTES)
def test_gradients_equal_the_default_mode(use_backend, route):
    use_backend(route)
    x, dout = torch.randn(24, 32), torch.randn(24, 32)
    _, default = _run(_block(recompute=False), x, dout)
    _, recomputed = _run(_block(recompute=True), x, dout)
    for name, g in default.items():
        assert_close(recomputed[name], g.double(), f"grad {name}")


@pytest.mark.parametrize("route", [*ROUTES, "composite"])
def test_gradient_penalty_and_torch_func(use_backend, route):
    """Double backward (a penalty on dx and on the weight gradients) and torch.func, against float64 eager."""
    use_backend(route)
    block = _block(width=16)
    reference = fr.ResidualBlock(16, 16).double()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(10, 16, dtype=torch.float64)
    for model, xin in ((reference, x.clone()), (block, x.float())):
        xin.requires_grad_(True)
        y = model(xin)
        grads = torch.autograd.grad(y.pow(2).sum(), [xin, *model.parameters()], create_graph=True)
        (y.sum() + sum(g.pow(2).sum() for g in grads)).backward()
    ref = dict(reference.named_parameters())
    for name, p in block.named_parameters():
        assert_close(p.grad, ref[name].grad, f"grad {name}", scale=20)
    params = {k: v.detach() for k, v in block.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(block, p, (x.float(),)).pow(2).sum())(params)
    want = torch.func.grad(lambda p: torch.func.functional_call(reference, p, (x,)).pow(2).sum())(
        {k: v.detach() for k, v in reference.named_parameters()})
    for name in got:
        assert_close(got[name], want[name], f"func.grad {name}", scale=10)


def test_backward_flops_are_one_gemm_more(use_backend):
    """The torch route: recompute's backward runs exactly one more GEMM (x W1^T); checkpointing runs two."""
    use_backend("torch")
    rows, width = 64, 32
    x = torch.randn(rows, width, requires_grad=True)
    flops = {}
    for recompute in (False, True):
        block = _block(width=width, recompute=recompute)
        out = block(x)
        with FlopCounterMode(display=False) as counter:
            out.sum().backward()
        flops[recompute] = counter.get_total_flops()
    assert flops[True] - flops[False] == 2 * rows * width * width


@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
@pytest.mark.parametrize("route,extra", [("triton", 0), ("triton:two_gemm", 1)])
def test_backward_launches(use_backend, route, extra):
    """On chip in the whole-block backward (no extra launch); one extra GEMM launch on the two-GEMM path."""
    from fused_residual.kernels._launch import count_launches

    use_backend(route)
    x = torch.randn(32, 16, requires_grad=True)
    launches = {}
    for recompute in (False, True):
        out = _block(width=16, recompute=recompute)(x)
        with count_launches() as counted:
            out.sum().backward()
        launches[recompute] = sum(counted.values())
    assert launches[True] == launches[False] + extra, launches


def test_option_is_shown_and_passed_on():
    block = fr.FusedResidualBlock(8, 8, recompute=True)
    assert "recompute=True" in repr(block)
    assert "recompute" not in repr(fr.FusedResidualBlock(8, 8))
    net = fr.FusedResidualNet(8, 8, 8, 3, recompute=True)
    assert all(b.recompute for b in net.blocks)
    model = torch.nn.Sequential(fr.ResidualBlock(8, 8), fr.ResidualBlock(8, 8))
    fr.fuse(model, recompute=True)
    assert all(isinstance(m, fr.FusedResidualBlock) and m.recompute for m in model)


def test_unfuse_leaves_a_recompute_block_fused_and_says_why():
    model = torch.nn.Sequential(fr.FusedResidualBlock(8, 8, recompute=True), fr.FusedResidualBlock(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fr.unfuse(model)
    assert isinstance(model[0], fr.FusedResidualBlock) and isinstance(model[1], fr.ResidualBlock)
    assert any("recompute" in str(w.message) for w in caught)


@pytest.mark.parametrize("route", ROUTES)
def test_functional_api(use_backend, route):
    use_backend(route)
    block = _block(width=32, recompute=False)
    x = torch.randn(16, 32, requires_grad=True)
    args = (block.linear1.weight, block.linear1.bias, block.linear2.weight, block.linear2.bias)
    out, kept = kept_for_backward(lambda: fr.functional.residual_block(x, *args, recompute=True),
                                  exclude=list(block.parameters()))
    assert kept.nbytes == 16 * 32 * FP32 + 16 * 32 // 8
    torch.testing.assert_close(out, block(x))


def test_forced_composite_recomputes_by_checkpointing(use_backend):
    """Plain ops only (FUSED_RESIDUAL_BACKEND=composite): the block runs under checkpointing, which keeps x."""
    use_backend("composite")
    block = _block(width=16)
    x, dout = torch.randn(24, 16), torch.randn(24, 16)
    _, kept = kept_by_module(block, x.requires_grad_(True))
    assert kept.nbytes == 24 * 16 * FP32
    out, grads = _run(block, x, dout)
    out64, grads64 = plain_float64(block, x, dout)
    assert_close(out, out64, "out")
    for name, g in grads.items():
        assert_close(g, grads64[name], f"grad {name}")


def test_the_saving_mode_is_part_of_a_call_signature(use_backend):
    """Default and recompute calls of one signature each keep what their mode says (plans are not shared)."""
    use_backend("torch")
    block = _block(width=32, recompute=False)
    x = torch.randn(16, 32, requires_grad=True)
    for recompute in (False, True, False, True):
        block.recompute = recompute
        _, kept = kept_by_module(block, x)
        assert kept.nbytes == (16 * 32 * FP32 + 16 * 32 // 8 if recompute else 3 * 16 * 32 * FP32)


@pytest.mark.parametrize("route", ["torch", "auto"])
def test_under_torch_compile(use_backend, route):
    use_backend(route)
    block = _block(width=16)
    x, dout = torch.randn(12, 16), torch.randn(12, 16)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, x, dout)
    out64, grads64 = plain_float64(block, x, dout)
    assert_close(out, out64, "out")
    for name, g in grads.items():
        assert_close(g, grads64[name.removeprefix("_orig_mod.")], f"grad {name}")
