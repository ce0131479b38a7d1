"""torch.distributed: DDP and FSDP2 over gloo with 2 CPU processes, against one process on the whole batch.

One spawn of 2 worker processes (module-scoped fixture) runs both scenarios; each rank takes half of the batch:

- DDP: a reference model made fused by ``fr.fuse`` before wrapping, one forward/backward. After DDP's
  all-reduce every rank holds the gradient of the mean loss over the whole batch: compared with the reference
  model in float64 on the whole batch.
- FSDP2: ``fully_shard`` on each block and on a FusedResidualNet, a few Adam steps. The mean of the ranks' losses
  is the whole-batch loss: compared step by step with the unsharded net trained in this process.

Rendezvous through a file store in a temporary folder; gloo talks over the loopback interface only. Every wait
is bounded: a hung worker fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from conftest import HAS_CUDA, assert_close, float64_reference

import fused_residual as fr

pytestmark = pytest.mark.distributed

WORLD = 2
ROWS, IN, HIDDEN, OUT, BLOCKS, STEPS = 8, 5, 16, 3, 2, 3
TIMEOUT_S = 120
# gloo has reduce_scatter (which FSDP2 needs) from PyTorch 2.8 on.
FSDP2_ON_GLOO = torch.__version__ >= "2.8"


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # PyTorch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(ROWS, IN, generator=g).to(device), torch.randn(ROWS, OUT, generator=g).to(device)


def reference_model(device="cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), fr.ResidualBlock(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               fr.ResidualBlock(HIDDEN, HIDDEN), torch.nn.Linear(HIDDEN, OUT)).to(device)


def fsdp_net(device="cpu") -> fr.FusedResidualNet:
    torch.manual_seed(0)
    return fr.FusedResidualNet(IN, HIDDEN, OUT, BLOCKS, device=device)


def train_losses(net, x, y, steps=STEPS, all_reduce=None) -> list[float]:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if all_reduce is not None:
            all_reduce(loss)
        losses.append(loss.item())
    return losses


def _worker(rank: int, store_path: str, out_path: str, run_fsdp: bool) -> None:
    """One rank: DDP gradients, then FSDP2 losses; rank 0 saves them to ``out_path``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        x, y = batch()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        results = {}

        model = DistributedDataParallel(fr.fuse(reference_model()))
        assert isinstance(model.module[1], fr.FusedResidualBlock)
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        results["ddp"] = {name: p.grad for name, p in model.module.named_parameters()}

        if run_fsdp:
            net = fsdp_net()
            fully_shard = fully_shard_fn()
            for block in net.blocks:
                fully_shard(block)
            fully_shard(net)

            def mean_over_ranks(t):
                dist.all_reduce(t)
                t /= WORLD

            results["fsdp"] = train_losses(net, xs, ys, all_reduce=mean_over_ranks)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    out_path = str(folder / "results.pt")
    context = mp.start_processes(_worker, args=(str(folder / "store"), out_path, FSDP2_ON_GLOO), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} worker processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return torch.load(out_path, weights_only=True)


def test_ddp_gradients_equal_one_process_on_the_whole_batch(distributed_results):
    model = reference_model()
    x, y = batch()
    # d(mean squared error)/d(prediction), so the float64 reference's backward gives the loss's gradients.
    with torch.no_grad():
        prediction = model(x)
    dout = 2 * (prediction - y) / y.numel()
    _, expected = float64_reference(model, x, dout)
    grads = distributed_results["ddp"]
    assert set(grads) == set(expected) - {"x"}
    for name, grad in grads.items():
        assert_close(grad, expected[name], f"DDP grad {name}", scale=8)


@pytest.mark.skipif(not FSDP2_ON_GLOO, reason="gloo has no reduce_scatter before PyTorch 2.8 (FSDP2 needs it); "
                    "test_fsdp2_on_cuda covers FSDP2 there")
def test_fsdp2_trains_with_the_same_losses_as_unsharded(distributed_results):
    x, y = batch()
    expected = train_losses(fsdp_net(), x, y)
    losses = distributed_results["fsdp"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_fsdp2_on_cuda_trains_with_the_same_losses_as_unsharded(tmp_path):
    """FSDP2 with NCCL in this process (world size 1): parameters become DTensors, all-gathered around each
    block; the Triton backend runs the blocks."""
    import torch.distributed as dist

    x, y = batch("cuda")
    expected = train_losses(fsdp_net("cuda"), x, y)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        net = fsdp_net("cuda")
        fully_shard = fully_shard_fn()
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
        losses = train_losses(net, x, y)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-4, atol=1e-5)
