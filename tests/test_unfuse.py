"""unfuse(): the inverse of fuse(), back to fr.ResidualBlock / fr.ResidualNet with the same Parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_residual as fr


def reference_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), fr.ResidualBlock(8, 8), nn.Sequential(fr.ResidualBlock(8, 8)),
                         fr.ResidualNet(8, 12, 3, 2))


def outputs_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad()
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    out.backward(torch.ones_like(out))
    return out.detach(), xr.grad, [p.grad.clone() for p in model.parameters()]


def test_fuse_then_unfuse_gives_the_original_model_back_bit_for_bit():
    model = reference_model()
    x = torch.randn(6, 4)
    out, dx, grads = outputs_and_grads(model, x)
    params, state = list(model.parameters()), model.state_dict()
    fr.fuse(model)
    assert sum(isinstance(m, fr.FusedResidualBlock) for m in model.modules()) == 4
    assert fr.unfuse(model) is model
    assert not [m for m in model.modules() if isinstance(m, (fr.FusedResidualBlock, fr.FusedResidualNet))]
    assert [type(m) for m in (model[1], model[2][0], model[3], *model[3].blocks)] == [fr.ResidualBlock] * 2 + [
        fr.ResidualNet] + [fr.ResidualBlock] * 2
    assert isinstance(model[1].relu, nn.ReLU) and model[1].relu.inplace
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    new_state = model.state_dict()
    assert list(new_state) == list(state)
    assert all(new_state[k].data_ptr() == state[k].data_ptr() for k in state)
    out2, dx2, grads2 = outputs_and_grads(model, x)
    assert torch.equal(out2, out) and torch.equal(dx2, dx)
    assert all(torch.equal(a, b) for a, b in zip(grads2, grads, strict=True))


def test_a_fused_net_unfuses_to_a_residual_net_with_the_same_state_dict():
    torch.manual_seed(1)
    reference = fr.ResidualNet(5, 10, 2, 3)
    torch.manual_seed(1)
    net = fr.FusedResidualNet(5, 10, 2, 3).eval()
    state = net.state_dict()
    plain = fr.unfuse(net)
    assert type(plain) is fr.ResidualNet and not plain.training
    assert all(type(b) is fr.ResidualBlock and not b.training for b in plain.blocks)
    assert plain.linear1 is net.linear1 and plain.linear2 is net.linear2 and plain.blocks is net.blocks
    assert list(plain.state_dict()) == list(state) == list(reference.state_dict())
    assert all(plain.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())
    x = torch.randn(7, 5)
    assert torch.equal(plain(x), reference(x))  # the same modules, the same parameters: the same bits


def test_a_net_inside_a_model_is_unfused_too():
    torch.manual_seed(2)
    model = nn.Sequential(fr.FusedResidualNet(3, 6, 2, 1), nn.Tanh())
    fr.unfuse(model)
    assert type(model[0]) is fr.ResidualNet and type(model[0].blocks[0]) is fr.ResidualBlock


def test_optimizer_state_stays_valid():
    torch.manual_seed(3)
    net = fr.FusedResidualNet(4, 8, 2, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(5, 4)
    net(x).square().sum().backward()
    optimizer.step()
    plain = fr.unfuse(net)
    assert set(optimizer.state) == set(plain.parameters())
    before = [p.detach().clone() for p in plain.parameters()]
    optimizer.zero_grad()
    plain(x).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, plain.parameters(), strict=True))


def test_unfuse_carries_the_hooks_and_their_handles_both_ways():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), fr.ResidualBlock(8, 8))
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append("forward"))
    model[1].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    model[1].register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    x = torch.randn(3, 4)
    fr.unfuse(fr.fuse(model))
    assert type(model[1]) is fr.ResidualBlock
    model(x).sum().backward()
    assert seen == ["pre", "forward", "backward"]
    handle.remove()  # the handle registered before fuse() still removes the hook
    seen.clear()
    model(x)
    assert seen == ["pre"]


def test_a_block_used_in_several_places_becomes_one_plain_block():
    torch.manual_seed(5)
    block = fr.FusedResidualBlock(6, 6)
    model = nn.Sequential(block, nn.ReLU(), block, nn.Sequential(block))
    fr.unfuse(model)
    assert type(model[0]) is fr.ResidualBlock and model[0] is model[2] is model[3][0]
    assert model[0].linear1 is block.linear1
    assert len(list(model.parameters())) == 4


def test_unfuse_of_a_block_itself_returns_its_replacement_and_allocates_nothing():
    block = fr.FusedResidualBlock(4, 4)
    rng = torch.get_rng_state()
    plain = fr.unfuse(block)
    assert torch.equal(torch.get_rng_state(), rng), "unfuse() drew random numbers"
    assert type(plain) is fr.ResidualBlock and plain.linear2 is block.linear2
    assert all(p.device.type == "cpu" for p in plain.parameters())
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), torch.relu(block.linear2(torch.relu(block.linear1(x))) + x))


class FusedSubclass(fr.FusedResidualBlock):
    pass


@pytest.mark.parametrize(("make", "why"), [
    (lambda: fr.FusedResidualBlock(4, 6, projection=True), "projection shortcut"),
    (lambda: fr.FusedResidualBlock(6, 6, hidden_features=12), r"hidden_features \(12\) != out_features \(6\)"),
    (lambda: fr.FusedResidualBlock(6, 6, activation="gelu"), "activation='gelu'"),
    (lambda: fr.FusedResidualBlock(6, 6, final_activation=None), "final_activation=None"),
    (lambda: FusedSubclass(6, 6), "FusedSubclass, a subclass"),
], ids=["projection", "bottleneck", "gelu", "ffn", "subclass"])
def test_blocks_without_a_residual_block_equivalent_stay_fused_with_a_warning(make, why):
    torch.manual_seed(6)
    block = make()
    model = nn.Sequential(block, fr.FusedResidualBlock(6, 6))
    with pytest.warns(UserWarning, match=f"unfuse\\(\\): left 0 fused: .*{why}"):
        fr.unfuse(model)
    assert model[0] is block
    assert type(model[1]) is fr.ResidualBlock


def test_a_net_subclass_stays_with_a_warning_and_its_blocks_are_unfused():
    class MyNet(fr.FusedResidualNet):
        pass

    net = MyNet(3, 6, 2, 2)
    with pytest.warns(UserWarning, match="left the model a MyNet \\(its blocks unfused\\)"):
        assert fr.unfuse(net) is net
    assert all(type(b) is fr.ResidualBlock for b in net.blocks)
    x = torch.randn(4, 3)
    h = torch.relu(net.linear1(x))
    for block in net.blocks:
        h = torch.relu(block.linear2(torch.relu(block.linear1(h))) + h)
    torch.testing.assert_close(net(x), net.linear2(h))
