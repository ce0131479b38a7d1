"""nn.Module conventions: construction, parameters, state_dicts, fuse(), repr, factory kwargs."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded_pair
from torch import nn

import fused_residual as fr


def test_same_seed_gives_bit_identical_parameters_and_state_dict_keys():
    reference, fused = seeded_pair(7, 7, seed=3)
    ref_sd, fused_sd = reference.state_dict(), fused.state_dict()
    assert list(ref_sd) == list(fused_sd) == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    for key in ref_sd:
        assert torch.equal(ref_sd[key], fused_sd[key]), key


def test_net_same_seed_gives_identical_parameters_and_keys():
    torch.manual_seed(5)
    reference = fr.ResidualNet(5, 10, 2, 3)
    torch.manual_seed(5)
    fused = fr.FusedResidualNet(5, 10, 2, 3)
    ref_sd, fused_sd = reference.state_dict(), fused.state_dict()
    assert list(ref_sd) == list(fused_sd)
    assert "blocks.2.linear2.bias" in ref_sd
    assert all(torch.equal(ref_sd[k], fused_sd[k]) for k in ref_sd)


@pytest.mark.parametrize("direction", ["reference_to_fused", "fused_to_reference"])
def test_state_dict_loads_both_ways_strict(direction):
    torch.manual_seed(0)
    reference, fused = fr.ResidualNet(4, 8, 3, 2), fr.FusedResidualNet(4, 8, 3, 2)
    src, dst = (reference, fused) if direction == "reference_to_fused" else (fused, reference)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(6, 4)
    assert torch.allclose(src(x), dst(x), atol=1e-6)


def test_unequal_features_without_projection_raises_value_error_that_says_what_to_do():
    with pytest.raises(ValueError, match=r"in_features \(5\) != out_features \(10\).*projection=True"):
        fr.FusedResidualBlock(5, 10)


def test_projection_block_matches_its_definition():
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(5, 10, projection=True).double()
    assert [n for n, _ in block.named_parameters()] == [
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "shortcut.weight"]
    assert block.shortcut.bias is None
    x = torch.randn(7, 5, dtype=torch.float64)
    h = torch.relu(block.linear1(x))
    expected = torch.relu(block.linear2(h) + block.shortcut(x))
    torch.testing.assert_close(block(x), expected)


def test_factory_kwargs_and_extra_repr():
    block = fr.FusedResidualBlock(6, 6, device="meta", dtype=torch.float16)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in block.parameters())
    net = fr.FusedResidualNet(3, 6, 2, 2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert "in_features=6, out_features=6, projection=False" in repr(block)


def test_fuse_swaps_blocks_in_place_sharing_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), fr.ResidualBlock(8, 8), nn.Sequential(fr.ResidualBlock(8, 8)))
    params_before = list(model.parameters())
    x = torch.randn(5, 4)
    expected = model(x)
    returned = fr.fuse(model)
    assert returned is model
    assert isinstance(model[1], fr.FusedResidualBlock) and isinstance(model[2][0], fr.FusedResidualBlock)
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    torch.testing.assert_close(model(x), expected)


class UserBlock(nn.Module):
    """A user's own block with the reference's structure."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear2(torch.relu(self.linear1(x))) + x)


def test_fuse_handles_a_users_own_block_class_and_keeps_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(UserBlock(6), UserBlock(6)).eval()
    x = torch.randn(3, 6)
    expected = model(x)
    fr.fuse(model, block_type=UserBlock)
    assert all(isinstance(m, fr.FusedResidualBlock) and not m.training for m in model)
    torch.testing.assert_close(model(x), expected)


def test_fuse_of_a_block_itself_returns_its_replacement():
    block = fr.ResidualBlock(4, 4)
    fused = fr.fuse(block)
    assert isinstance(fused, fr.FusedResidualBlock) and fused.linear1 is block.linear1


def test_fuse_rejects_a_block_without_the_structure():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = nn.Linear(3, 4)
            self.linear2 = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="3 -> 4"):
        fr.fuse(nn.Sequential(Odd()), block_type=Odd)
