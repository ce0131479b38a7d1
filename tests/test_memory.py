"""What the block keeps for backward: never more than the reference, nothing when no grad is needed."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded_pair


def saved_bytes(fn, parameters=()) -> tuple[int, int]:
    """(unique saved bytes, count of saved tensors) while ``fn`` runs, through saved-tensor hooks. Storages of
    ``parameters`` are not counted: the module holds them anyway, so saving them costs no memory."""
    held = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        if t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), count


@pytest.mark.parametrize("rows,width", [(256, 32), (64, 128)])
def test_saved_bytes_do_not_exceed_the_reference(use_backend, rows, width):
    use_backend("torch")
    reference, fused = seeded_pair(width, width)
    x = torch.randn(rows, width, requires_grad=True)
    ref_bytes, _ = saved_bytes(lambda: reference(x), reference.parameters())
    fused_bytes, _ = saved_bytes(lambda: fused(x), fused.parameters())
    assert fused_bytes <= ref_bytes, (fused_bytes, ref_bytes)
    # x, h and out: 3 of (rows x width).
    assert fused_bytes <= 3 * rows * width * 4


def test_nothing_is_saved_when_no_input_needs_grad(use_backend):
    use_backend("torch")
    _, fused = seeded_pair(16, 16)
    fused.requires_grad_(False)
    assert saved_bytes(lambda: fused(torch.randn(8, 16))) == (0, 0)
    with torch.inference_mode():
        assert saved_bytes(lambda: fused(torch.randn(8, 16))) == (0, 0)


def test_input_is_not_saved_when_only_it_needs_grad(use_backend):
    use_backend("torch")
    _, fused = seeded_pair(16, 16)
    fused.requires_grad_(False)
    x = torch.randn(8, 16, requires_grad=True)
    # h and out are needed for the masks, the weights for the chain rule; x itself is not.
    nbytes, count = saved_bytes(lambda: fused(x))
    assert count == 4 and nbytes == 2 * 8 * 16 * 4 + 2 * 16 * 16 * 4
