"""fuse() swaps a block only where the fused block computes what the block computes: a structural check (plain
linears, an activation submodule of the right kind, no other state), then a numerical one on float64 copies in
train() and eval(). Otherwise the block stays, with a warning that says why; no parameter or buffer is lost."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_residual as fr
from fused_residual import fusing


@pytest.fixture(autouse=True)
def _fresh_check_cache():
    fusing.clear_verified()
    yield
    fusing.clear_verified()


def plain_block_math(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference block's math in float64, written out with plain ops."""
    w1, b1 = block.linear1.weight.double(), block.linear1.bias.double()
    w2, b2 = block.linear2.weight.double(), block.linear2.bias.double()
    x = x.double()
    return torch.relu(torch.relu(x @ w1.t() + b1) @ w2.t() + b2 + x)


class TanhBlock(nn.Module):
    """linear1/linear2 like the reference, but a tanh where the reference has its final ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.linear2(torch.relu(self.linear1(x))) + x)


class DropoutBlock(nn.Module):
    """The reference math in eval(); a functional dropout on the hidden layer in train()."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = F.dropout(torch.relu(self.linear1(x)), p=0.1, training=self.training)
        return torch.relu(self.linear2(h) + x)


class UserBlock(nn.Module):
    """A user's own block with the reference's structure and math (counts its forward calls per class)."""

    calls = 0

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        type(self).calls += 1
        return torch.relu(self.linear2(torch.relu(self.linear1(x))) + x)


def fuse_expecting_warning(model, match, **kwargs):
    with pytest.warns(UserWarning, match=match):
        return fr.fuse(model, **kwargs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fuse_keeps_a_block_whose_forward_computes_other_math(mode):
    torch.manual_seed(0)
    model = nn.Sequential(TanhBlock(8)).train(mode == "train")
    x = torch.randn(5, 8)
    before = model(x).detach()
    with pytest.warns(UserWarning, match=r"left 0 \(TanhBlock\) unfused: .*differs by \d"):
        fr.fuse(model, block_type=TanhBlock)
    assert type(model[0]) is TanhBlock
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_fuse_catches_a_dropout_that_acts_only_in_training():
    torch.manual_seed(1)
    model = nn.Sequential(DropoutBlock(8)).eval()  # in eval() it is the reference's math: train() must catch it
    with pytest.warns(UserWarning, match=r"DropoutBlock\) unfused: .*in train\(\) mode"):
        fr.fuse(model, block_type=DropoutBlock)
    assert type(model[0]) is DropoutBlock and not model[0].training


@pytest.mark.parametrize("replacement", [nn.GELU, nn.Tanh, nn.Identity, nn.LeakyReLU])
def test_fuse_keeps_a_block_whose_relu_was_replaced(replacement):
    torch.manual_seed(2)
    block = fr.ResidualBlock(8, 8)
    block.relu = replacement()
    model = nn.Sequential(block)
    fuse_expecting_warning(model, rf"unfused: its submodule relu is an? {replacement.__name__}")
    assert model[0] is block


def test_fuse_takes_the_activation_submodule_of_the_form_asked_for():
    class GeluFFN(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.linear1, self.act, self.linear2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.linear2(self.act(self.linear1(x)))

    torch.manual_seed(3)
    model = nn.Sequential(GeluFFN(6), GeluFFN(6))
    x = torch.randn(4, 6, dtype=torch.float64)
    model.double()
    expected = x
    for ffn in model:
        h = x_in = expected
        h = F.gelu(h @ ffn.linear1.weight.t() + ffn.linear1.bias)
        expected = x_in + h @ ffn.linear2.weight.t() + ffn.linear2.bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.fuse(model, block_type=GeluFFN, activation="gelu", final_activation=None)
    assert all(type(m) is fr.FusedResidualBlock for m in model)
    torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=1e-10)
    # The tanh approximation is another activation: the same class does not compute it.
    model = nn.Sequential(GeluFFN(6))
    fuse_expecting_warning(model, r"its submodule act is a GELU\(approximate='none'\)", block_type=GeluFFN,
                           activation="gelu_tanh", final_activation=None)
    assert type(model[0]) is GeluFFN


@pytest.mark.parametrize("extra", ["parameter", "buffer", "non_persistent_buffer", "submodule", "subclass"])
def test_fuse_never_loses_a_parameter_or_buffer(extra):
    class Gained(fr.ResidualBlock):
        def __init__(self, width):
            super().__init__(width, width)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    torch.manual_seed(4)
    block = Gained(8) if extra == "subclass" else fr.ResidualBlock(8, 8)
    if extra == "parameter":
        block.gain = nn.Parameter(torch.ones(8))
    elif extra == "buffer":
        block.register_buffer("running", torch.zeros(8))
    elif extra == "non_persistent_buffer":
        block.register_buffer("scratch", torch.zeros(8), persistent=False)
    elif extra == "submodule":
        block.norm = nn.LayerNorm(8)
    model = nn.Sequential(block)
    params, keys = list(model.parameters()), list(model.state_dict())
    buffers = list(model.buffers())
    fuse_expecting_warning(model, r"left 0 \((ResidualBlock|Gained)\) unfused: it holds")
    assert model[0] is block
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    assert len(list(model.buffers())) == len(buffers)


def test_the_check_touches_neither_the_rng_nor_the_block():
    torch.manual_seed(5)
    block = UserBlock(8).train()
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append("hook"))
    weights = [p.detach().clone() for p in block.parameters()]
    model = nn.Sequential(block)
    cpu_state = torch.get_rng_state()
    fr.fuse(model, block_type=UserBlock)
    assert torch.equal(torch.get_rng_state(), cpu_state), "fuse() drew from the global random generator"
    assert seen == [], "the check called the block (its hooks fired)"
    assert all(p.grad is None for p in block.parameters())
    assert all(torch.equal(p, w) for p, w in zip(block.parameters(), weights, strict=True))
    assert isinstance(model[0], fr.FusedResidualBlock) and model[0].training
    assert model[0].linear1 is block.linear1


def test_the_check_runs_once_per_class_and_configuration():
    torch.manual_seed(6)
    UserBlock.calls = 0
    model = nn.Sequential(UserBlock(8), UserBlock(8), UserBlock(8))
    fr.fuse(model, block_type=UserBlock)
    first = UserBlock.calls
    assert first > 0
    fr.fuse(nn.Sequential(UserBlock(8)), block_type=UserBlock)
    assert UserBlock.calls == first, "the same class and widths were checked again"
    fr.fuse(nn.Sequential(UserBlock(6)), block_type=UserBlock)
    assert UserBlock.calls == 2 * first, "another width is another configuration"
    assert all(isinstance(m, fr.FusedResidualBlock) for m in model)


def test_an_instance_attribute_is_part_of_the_configuration():
    class Scaled(nn.Module):
        def __init__(self, width, scale):
            super().__init__()
            self.linear1, self.linear2, self.scale = nn.Linear(width, width), nn.Linear(width, width), scale

        def forward(self, x):
            return torch.relu(self.linear2(torch.relu(self.linear1(x))) * self.scale + x)

    model = nn.Sequential(Scaled(8, 1.0), Scaled(8, 2.0))
    fuse_expecting_warning(model, r"left 1 \(Scaled\) unfused", block_type=Scaled)
    assert isinstance(model[0], fr.FusedResidualBlock) and type(model[1]) is Scaled


def test_a_forward_that_fails_in_float64_keeps_the_block():
    class Float32Only(UserBlock):
        def forward(self, x):
            assert x.dtype == torch.float32, "float32 only"
            return super().forward(x)

    model = nn.Sequential(Float32Only(8))
    fuse_expecting_warning(model, r"unfused: the check could not run its forward in float64 .*float32 only",
                           block_type=Float32Only)
    assert type(model[0]) is Float32Only


def test_sharded_parameters_keep_the_block():
    class Shard(torch.Tensor):
        """Stands in for a sharded parameter (FSDP2's DTensor): a tensor subclass."""

    block = fr.ResidualBlock(8, 8)
    block.linear1.weight = nn.Parameter(block.linear1.weight.detach().as_subclass(Shard))
    model = nn.Sequential(block)
    fuse_expecting_warning(model, r"unfused: linear1.weight is a Shard, not a plain tensor")
    assert model[0] is block


def test_a_block_on_the_meta_device_is_checked_with_fresh_weights_and_fused():
    with torch.device("meta"):
        model = nn.Sequential(fr.ResidualBlock(8, 8))
    bad = nn.Sequential(TanhBlock(8).to("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.fuse(model)
    assert isinstance(model[0], fr.FusedResidualBlock) and model[0].linear1.weight.is_meta
    fuse_expecting_warning(bad, r"differs by", block_type=TanhBlock)


def test_verify_false_skips_the_numerical_check_but_never_loses_state():
    model = nn.Sequential(TanhBlock(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.fuse(model, block_type=TanhBlock, verify=False)
    assert isinstance(model[0], fr.FusedResidualBlock)
    block = fr.ResidualBlock(8, 8)
    block.gain = nn.Parameter(torch.ones(8))
    model = nn.Sequential(block)
    fuse_expecting_warning(model, r"it holds", verify=False)
    assert model[0] is block


def test_a_fused_reference_block_computes_the_reference_math():
    torch.manual_seed(7)
    model = nn.Sequential(fr.ResidualBlock(8, 8), fr.ResidualBlock(8, 8))
    x = torch.randn(6, 8)
    expected = plain_block_math(model[1], plain_block_math(model[0], x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr.fuse(model)
    assert all(isinstance(m, fr.FusedResidualBlock) for m in model)
    torch.testing.assert_close(model(x).double(), expected, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("odd", ["tuple", "detached", "detached_shortcut", "wrong_shape", "float32"])
def test_odd_forwards_are_caught(odd):
    class Odd(UserBlock):
        def forward(self, x):
            out = super().forward(x)
            if odd == "tuple":
                return out, x
            if odd == "detached":
                return out.detach()
            if odd == "detached_shortcut":  # the same values, but no gradient through the shortcut
                return torch.relu(self.linear2(torch.relu(self.linear1(x))) + x.detach())
            if odd == "wrong_shape":
                return out[:1]
            return out.float()

    model = nn.Sequential(Odd(8))
    fuse_expecting_warning(model, r"Odd\) unfused: its forward does not compute", block_type=Odd)
    assert type(model[0]) is Odd


def test_the_check_runs_under_no_grad_inference_mode_and_autocast():
    model = nn.Sequential(UserBlock(8), TanhBlock(8))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match=r"TanhBlock\) unfused"):
            fr.fuse(model, block_type=UserBlock)
            fr.fuse(model, block_type=TanhBlock)
    assert isinstance(model[0], fr.FusedResidualBlock) and type(model[1]) is TanhBlock
