"""The bytes-kept helper of the memory benchmark (``benchmarks/kept.py``) counts what autograd keeps, once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.kept import kept_by_module, kept_for_backward


def test_an_eager_linear_relu_keeps_its_input_and_output():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 4, requires_grad=True)
    y, kept = kept_for_backward(lambda: torch.relu(F.linear(x, w)), exclude=[w])
    # F.linear keeps x (for dW) and w (for dx, excluded); relu keeps its output.
    assert kept.nbytes == 16 * 4 * 4 + 16 * 8 * 4
    assert kept.storages == 2 and kept.tensors == 3
    assert kept.excluded_nbytes == 8 * 4 * 4
    assert kept.by_dtype == {"float32": kept.nbytes}
    y.sum().backward()  # what was kept still serves the backward
    assert x.grad is not None and w.grad is not None


def test_views_of_one_storage_count_once():
    class TwoViews(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a[:2], a[2:], a.t())
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    a = torch.randn(6, 3, requires_grad=True)
    _, kept = kept_for_backward(lambda: TwoViews.apply(a))
    assert kept.tensors == 3 and kept.storages == 1 and kept.nbytes == 6 * 3 * 4


def test_storage_is_counted_whole_and_mixed_dtypes_apart():
    class Saves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            big = torch.zeros(100, dtype=torch.float16)
            bits = torch.zeros(5, dtype=torch.uint8)
            ctx.save_for_backward(big[:3], bits)
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    _, kept = kept_for_backward(lambda: Saves.apply(torch.randn(2, requires_grad=True)))
    assert kept.by_dtype == {"float16": 200, "uint8": 5} and kept.nbytes == 205


def test_a_tensor_stashed_on_ctx_is_not_seen():
    """Why a backward must save through save_for_backward: offloading hooks never see a stashed tensor."""
    class Stashes(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.stashed = a.exp()
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return g * ctx.stashed

    _, kept = kept_for_backward(lambda: Stashes.apply(torch.randn(4, requires_grad=True)))
    assert kept.nbytes == 0 and kept.tensors == 0


def test_a_module_excludes_its_parameters_and_nothing_is_kept_without_grad():
    module = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    _, kept = kept_by_module(module, x)
    assert kept.nbytes == 3 * 4 * 4 and kept.excluded_nbytes == 4 * 4 * 4
    with torch.no_grad():
        _, kept = kept_by_module(module, x)
    assert kept.nbytes == 0 and kept.tensors == 0


def test_a_graph_dropped_inside_the_forward_keeps_nothing():
    w = torch.randn(64, 64, requires_grad=True)

    def forward():
        dropped = torch.mm(torch.randn(64, 64), w).sum()  # its saved input is freed with it
        del dropped
        return torch.mm(torch.randn(64, 64), w[:, :32])

    _, kept = kept_for_backward(forward, exclude=[w])
    assert kept.storages == 1 and kept.nbytes == 64 * 64 * 4


def test_a_storage_kept_twice_by_a_chain_counts_once():
    """A chain keeps each layer's output as the next layer's input: one storage, counted once."""
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(8, 32, requires_grad=True)
    _, kept = kept_for_backward(lambda: torch.relu(torch.relu(x @ w) @ w), exclude=[w])
    # x, the first relu's output (kept by it and by the second mm), the second relu's output; w twice.
    assert kept.tensors == 6 and kept.storages == 3 and kept.nbytes == 3 * 8 * 32 * 4
