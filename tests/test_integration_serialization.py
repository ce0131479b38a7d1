"""Serialization and copies: torch.save/torch.load of state_dicts and whole modules, copy.deepcopy, pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fused_residual as fr

# What a whole FusedResidualNet pickles besides tensors: the classes torch.load(weights_only=True) must be told
# are safe (README, "Using it in your model").
SAFE_GLOBALS = [fr.FusedResidualNet, fr.FusedResidualBlock, nn.Linear, nn.ModuleList]


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def make_net(seed: int = 0) -> fr.FusedResidualNet:
    torch.manual_seed(seed)
    return fr.FusedResidualNet(5, 12, 3, 2)


@pytest.mark.parametrize("target", [fr.FusedResidualNet, fr.ResidualNet])
def test_state_dict_round_trip_with_weights_only_load(target):
    net = make_net()
    state = torch.load(saved(net.state_dict()), weights_only=True)
    other = target(5, 12, 3, 2)
    other.load_state_dict(state, strict=True)
    x = torch.randn(4, 5)
    torch.testing.assert_close(other(x), net(x))


def test_whole_module_round_trip():
    net = make_net().eval()
    loaded = torch.load(saved(net), weights_only=False)  # a pickled module: only for files you trust
    assert type(loaded) is fr.FusedResidualNet and not loaded.training
    assert all(isinstance(b, fr.FusedResidualBlock) for b in loaded.blocks)
    x = torch.randn(4, 5)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_whole_module_loads_with_weights_only_when_its_classes_are_allowed():
    net, x = make_net(), torch.randn(4, 5)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(saved(net), weights_only=True)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        loaded = torch.load(saved(net), weights_only=True)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_projection_block_round_trip():
    torch.manual_seed(1)
    block = fr.FusedResidualBlock(4, 6, projection=True)
    loaded = torch.load(saved(block), weights_only=False)
    assert loaded.projection and loaded.shortcut.bias is None
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), block(x), rtol=0, atol=0)
    fresh = fr.FusedResidualBlock(4, 6, projection=True)
    fresh.load_state_dict(torch.load(saved(block.state_dict()), weights_only=True))
    torch.testing.assert_close(fresh(x), block(x), rtol=0, atol=0)


def test_deepcopy_is_independent_and_trains_the_same():
    net = make_net()
    twin = copy.deepcopy(net)
    assert all(a is not b for a, b in zip(net.parameters(), twin.parameters(), strict=True))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for model in (net, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_fused_model_state_dict_loads_into_the_unfused_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), fr.ResidualBlock(8, 8), fr.ResidualBlock(8, 8))
    plain = copy.deepcopy(model)
    fr.fuse(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    plain.load_state_dict(torch.load(saved(model.state_dict()), weights_only=True))
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), model(x))
