"""Modules run the kernels only for what the kernels compute exactly; otherwise they call their submodules.

Hooks must fire, replaced or subclassed layers must run their own ``forward``, and ``fuse()`` must swap only the
blocks it can reproduce exactly (carrying the block's own hooks), leaving the rest with a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import HAS_CUDA, assert_close, float64_reference, run_with_grads
from torch import nn

import fused_residual as fr

DEVICE = "cuda" if HAS_CUDA else "cpu"


class LoRALinear(nn.Linear):
    """A linear with its own forward (a low-rank update): not what the kernels compute."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.down = nn.Parameter(torch.randn(2, in_features))
        self.up = nn.Parameter(torch.randn(out_features, 2))

    def forward(self, x):
        return super().forward(x) + x @ self.down.t() @ self.up.t()


def net_and_reference(seed=0):
    torch.manual_seed(seed)
    reference = fr.ResidualNet(5, 16, 3, 2).to(DEVICE)
    fused = fr.FusedResidualNet(5, 16, 3, 2, device=DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


# ---- FusedResidualNet without autograd --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["block", "linear1", "linear2", "block.linear1", "net"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_net_forward_hooks_fire_without_autograd(where, mode):
    _, fused = net_and_reference()
    target = {"block": fused.blocks[1], "linear1": fused.linear1, "linear2": fused.linear2,
              "block.linear1": fused.blocks[0].linear1, "net": fused}[where]
    seen = []
    target.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    target.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    x = torch.randn(7, 5, device=DEVICE)
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        out = fused(x)
    assert len(seen) == 2 and seen[0] == "pre"
    expected, _ = float64_reference(fused, x, torch.zeros_like(out))
    assert_close(out, expected, "out")


def test_global_module_hooks_see_every_linear_of_the_net():
    _, fused = net_and_reference()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__) if isinstance(m, nn.Linear) else None)
    try:
        with torch.no_grad():
            fused(torch.randn(4, 5, device=DEVICE))
    finally:
        handle.remove()
    assert seen.count("Linear") == 2 + 2 * 2  # the net's two and each block's two


def test_net_with_a_replaced_head_runs_it():
    reference, fused = net_and_reference()
    head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(DEVICE)
    reference.linear2, fused.linear2 = head, head
    x = torch.randn(6, 5, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), reference.double()(x.double()), "out")


def test_net_with_a_linear_subclass_head_runs_its_forward():
    reference, fused = net_and_reference()
    torch.manual_seed(5)
    head = LoRALinear(16, 3).to(DEVICE)
    reference.linear2, fused.linear2 = head, head
    x = torch.randn(6, 5, device=DEVICE)
    with torch.no_grad():
        assert_close(fused(x), reference.double()(x.double()), "out", scale=4)


# ---- FusedResidualBlock ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [True, False])
def test_block_hooks_on_its_linears_fire_and_the_math_holds(grad):
    torch.manual_seed(6)
    fused = fr.FusedResidualBlock(12, 12, device=DEVICE)
    x, dout = torch.randn(5, 12, device=DEVICE), torch.randn(5, 12, device=DEVICE)
    expected, expected_grads = float64_reference(fused, x, dout)
    seen = []
    fused.linear1.register_forward_hook(lambda m, i, o: seen.append("linear1"))
    fused.linear2.register_full_backward_hook(lambda m, gi, go: seen.append("linear2 backward"))
    if grad:
        out, grads = run_with_grads(fused, x, dout)
        for name, g in grads.items():
            assert_close(g, expected_grads[name], f"grad {name}", scale=4)
        assert seen == ["linear1", "linear2 backward"]
    else:
        with torch.no_grad():
            out = fused(x)
        assert seen == ["linear1"]
    assert_close(out, expected, "out")


def test_block_with_a_parametrized_linear_takes_the_kernels_with_the_computed_weight():
    from torch.nn.utils import parametrizations

    torch.manual_seed(7)
    fused = fr.FusedResidualBlock(10, 10, device=DEVICE)
    parametrizations.weight_norm(fused.linear1)
    x, dout = torch.randn(4, 10, device=DEVICE), torch.randn(4, 10, device=DEVICE)
    plain = torch.relu(fused.linear2(torch.relu(fused.linear1(x))) + x)
    out, grads = run_with_grads(fused, x, dout)
    torch.testing.assert_close(out, plain)
    assert grads["linear1.parametrizations.weight.original0"] is not None


# ---- fuse() ------------------------------------------------------------------------------------------------

def test_fuse_carries_the_blocks_own_hooks_and_their_handles():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 8), fr.ResidualBlock(8, 8)).to(DEVICE)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append("forward"))
    model[1].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    model[1].register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    x = torch.randn(3, 4, device=DEVICE)
    expected = model(x)
    seen.clear()
    fr.fuse(model)
    assert isinstance(model[1], fr.FusedResidualBlock)
    out = model(x)
    out.sum().backward()
    assert seen == ["pre", "forward", "backward"]
    torch.testing.assert_close(out, expected)
    handle.remove()  # the handle still removes the hook from the fused block
    seen.clear()
    model(x)
    assert seen == ["pre"]


@pytest.mark.parametrize("case", ["linear_hook", "relu_hook", "lora", "weight_norm", "spectral_norm",
                                  "own_forward"])
def test_fuse_leaves_what_it_cannot_reproduce_with_a_warning(case):
    from torch.nn.utils import spectral_norm, weight_norm

    class OwnForward(fr.ResidualBlock):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(9)
    block = (OwnForward if case == "own_forward" else fr.ResidualBlock)(8, 8).to(DEVICE)
    if case == "linear_hook":
        block.linear1.register_forward_hook(lambda m, i, o: None)
    elif case == "relu_hook":
        block.relu.register_forward_hook(lambda m, i, o: None)
    elif case == "lora":
        block.linear2 = LoRALinear(8, 8).to(DEVICE)
    elif case == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            weight_norm(block.linear1)
    elif case == "spectral_norm":
        spectral_norm(block.linear2)
    model = nn.Sequential(block, nn.ReLU())
    with pytest.warns(UserWarning, match="left 0 .* unfused"):
        fr.fuse(model)
    assert model[0] is block
    # Training still matches the unfused block (old-style norms recompute their weight in a pre-hook).
    x = torch.randn(5, 8, device=DEVICE)
    model(x).sum().backward()


def test_fuse_swaps_every_use_of_a_shared_block_for_one_fused_block():
    torch.manual_seed(10)
    block = fr.ResidualBlock(6, 6).to(DEVICE)
    model = nn.Sequential(block, nn.ReLU(), block, nn.Sequential(block))
    x = torch.randn(4, 6, device=DEVICE)
    expected = model(x)
    fr.fuse(model)
    assert isinstance(model[0], fr.FusedResidualBlock)
    assert model[0] is model[2] is model[3][0]
    assert model[0].linear1 is block.linear1
    torch.testing.assert_close(model(x), expected)
    assert len(list(model.parameters())) == 4


def test_fuse_accepts_a_bottleneck_block_of_the_users_own_type():
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(8, 3), nn.Linear(3, 8)

        def forward(self, x):
            return torch.relu(self.linear2(torch.relu(self.linear1(x))) + x)

    torch.manual_seed(11)
    model = nn.Sequential(Bottleneck()).to(DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    expected = model(x)
    fr.fuse(model, block_type=Bottleneck)
    assert isinstance(model[0], fr.FusedResidualBlock) and model[0].hidden_features == 3
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("activation", list(fr.activations.ACTIVATIONS))
def test_fuse_swaps_a_users_transformer_ffn(activation):
    """A user's own FFN module, ``x + linear2(act(linear1(x)))`` with a 4x hidden width, fused with the pattern
    arguments: same outputs and gradients, same Parameters."""
    act = fr.activations.ACTIVATIONS[activation].forward

    class FFN(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.linear2(act(self.linear1(x)))

    torch.manual_seed(12)
    model = nn.Sequential(FFN(8), nn.LayerNorm(8), FFN(8)).to(DEVICE)
    x, dout = torch.randn(6, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    expected, expected_grads = run_with_grads(model, x, dout)
    params = list(model.parameters())
    fr.fuse(model, block_type=FFN, activation=activation, final_activation=None)
    assert isinstance(model[0], fr.FusedResidualBlock) and model[0].hidden_features == 32
    assert model[2].activation == activation and model[2].final_activation is None
    assert list(model.parameters()) == params
    for p in params:
        p.grad = None
    out, grads = run_with_grads(model, x, dout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], atol=1e-5, rtol=1e-5)
