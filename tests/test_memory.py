"""What the block keeps for backward (bytes of unique storages, ``benchmarks/kept.py``, parameters excluded).

Default mode: never more than the same math written as eager PyTorch, in every form, on every route, whether
``x`` needs a gradient or not, in chains; nothing when no gradient is needed. The expectations are eager modules
written here with plain ops, and byte counts worked out by hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_INSTALLED, seeded_pair
from torch import nn

import fused_residual as fr
from benchmarks.kept import kept_by_module, kept_for_backward
from fused_residual.activations import ACTIVATIONS

FP32 = 4
FORMS = {
    "reference": {},
    "ffn": {"hidden_features": 64, "activation": "gelu", "final_activation": None},
    "projection": {"projection": True},
    "silu": {"activation": "silu"},
    "hidden48": {"hidden_features": 48},
}
ROUTES = ["torch", "composite", "auto", *(["triton", "triton:two_gemm"] if TRITON_INSTALLED else [])]
class Eager(nn.Module):
    """The block's math as users write it in eager PyTorch, on the fused block's own submodules."""

    def __init__(self, block: fr.FusedResidualBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        y = b.linear2(ACTIVATIONS[b.activation].forward(b.linear1(x)))
        y = y + (x if b.shortcut is None else b.shortcut(x))
        return y if b.final_activation is None else torch.relu(y)


def _chain(modules):
    def run(x):
        for m in modules:
            x = m(x)
        return x

    return run


def _cases():
    for route, form, x_grad, params_grad, length in itertools.product(ROUTES, FORMS, (True, False), (True, False),
                                                                     (1, 2)):
        if not (x_grad or params_grad):
            continue
        ids = f"{route}-{form}-{'x_grad' if x_grad else 'x_frozen'}-{'p_grad' if params_grad else 'p_frozen'}-{length}"
        yield pytest.param(route, form, x_grad, params_grad, length, id=ids)


@pytest.mark.parametrize("route,form,x_grad,params_grad,length", list(_cases()))
def test_default_keeps_no_more_than_eager(use_backend, route, form, x_grad, params_grad, length):
    use_backend(route)
    torch.manual_seed(0)
    blocks = [fr.FusedResidualBlock(16, 16, **FORMS[form]) for _ in range(length)]
    params = [p.requires_grad_(params_grad) for b in blocks for p in b.parameters()]
    x = torch.randn(32, 16, requires_grad=x_grad)
    _, fused = kept_for_backward(lambda: _chain(blocks)(x), exclude=params)
    _, eager = kept_for_backward(lambda: _chain([Eager(b) for b in blocks])(x), exclude=params)
    assert fused.nbytes <= eager.nbytes, (fused, eager)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("x_grad", [True, False])
def test_default_net_keeps_no_more_than_the_reference_net(use_backend, route, x_grad):
    use_backend(route)
    torch.manual_seed(0)
    reference = fr.ResidualNet(16, 16, 16, 3)
    fused = fr.FusedResidualNet(16, 16, 16, 3)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(32, 16, requires_grad=x_grad)
    _, ref = kept_by_module(reference, x)
    _, got = kept_by_module(fused, x)
    assert got.nbytes <= ref.nbytes, (got, ref)
    # x (linear1's input), a0, each block's h and out (out is the next layer's input).
    assert ref.nbytes == (2 + 2 * 3) * 32 * 16 * FP32


@pytest.mark.parametrize("rows,width", [(256, 32), (64, 128)])
def test_saved_bytes_do_not_exceed_the_reference(use_backend, rows, width):
    use_backend("torch")
    reference, fused = seeded_pair(width, width)
    x = torch.randn(rows, width, requires_grad=True)
    _, ref = kept_by_module(reference, x)
    _, got = kept_by_module(fused, x)
    assert got.nbytes <= ref.nbytes, (got, ref)
    assert got.nbytes <= 3 * rows * width * FP32  # x, h and out


@pytest.mark.parametrize("route", ROUTES)
def test_nothing_is_kept_when_no_input_needs_grad(use_backend, route):
    use_backend(route)
    _, fused = seeded_pair(16, 16)
    fused.requires_grad_(False)
    for x in (torch.randn(8, 16), torch.randn(8, 16, requires_grad=True)):
        with torch.no_grad():
            assert kept_by_module(fused, x)[1].tensors == 0
    assert kept_by_module(fused, torch.randn(8, 16))[1].tensors == 0
    with torch.inference_mode():
        assert kept_by_module(fused, torch.randn(8, 16))[1].tensors == 0


@pytest.mark.parametrize("route", ["torch", *(["triton"] if TRITON_INSTALLED else [])])
def test_input_is_not_kept_when_only_it_needs_grad(use_backend, route):
    use_backend(route)
    _, fused = seeded_pair(16, 16)
    fused.requires_grad_(False)
    x = torch.randn(8, 16, requires_grad=True)
    # h and out serve the masks, the weights the chain rule; x itself is not needed.
    _, kept = kept_by_module(fused, x)
    assert kept.nbytes == 2 * 8 * 16 * FP32 and kept.storages == 2


def _ffn_pair(width):
    torch.manual_seed(0)
    fused = fr.FusedResidualBlock(width, width, hidden_features=4 * width, activation="gelu", final_activation=None)
    return Eager(fused), fused


@pytest.mark.parametrize("kind", ["block", "net", "ffn"])
def test_default_targets_at_4096_by_256(use_backend, kind):
    """One fp32 training step at 4096 x 256, x requiring grad: at most what the reference modules keep."""
    use_backend("torch")
    rows, width = 4096, 256
    torch.manual_seed(0)
    if kind == "block":
        reference, fused = seeded_pair(width, width)
    elif kind == "net":
        reference, fused = fr.ResidualNet(width, width, width, 4), fr.FusedResidualNet(width, width, width, 4)
        fused.load_state_dict(reference.state_dict())
    else:
        reference, fused = _ffn_pair(width)
    x = torch.randn(rows, width, requires_grad=True)
    _, ref = kept_by_module(reference, x)
    _, got = kept_by_module(fused, x)
    assert got.nbytes <= ref.nbytes, (got, ref)


def test_everything_the_backward_reads_is_saved_not_stashed(use_backend):
    """No tensor on the Function's ctx: saved-tensor hooks (``save_on_cpu``) must see all that is kept."""
    use_backend("torch")
    for form in FORMS.values():
        torch.manual_seed(0)
        block = fr.FusedResidualBlock(16, 16, **form)
        x = torch.randn(8, 16, requires_grad=True)
        out = block(x)
        stashed = {k: v for k, v in vars(out.grad_fn).items() if isinstance(v, torch.Tensor)
                   or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))}
        assert not stashed, (form, stashed)


def test_offloading_hooks_carry_the_backward(use_backend):
    """Saved tensors replaced by copies (what save_on_cpu does) give the same gradients."""
    use_backend("torch")
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    block(x).sum().backward()
    expected = [x.grad, *(p.grad for p in block.parameters())]
    x.grad = None
    block.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        out = block(x)
    out.sum().backward()
    for got, want in zip([x.grad, *(p.grad for p in block.parameters())], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_f_linear_helper_matches_eager_linear():
    """The Eager module above is plain PyTorch: F.linear with the block's own weights."""
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(8, 8, activation="gelu", final_activation=None)
    x = torch.randn(4, 8)
    expected = x + F.linear(F.gelu(F.linear(x, block.linear1.weight, block.linear1.bias)), block.linear2.weight,
                            block.linear2.bias)
    torch.testing.assert_close(Eager(block)(x), expected)
