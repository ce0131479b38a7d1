"""Bytes a forward keeps for backward, seen through ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor autograd saves (``ctx.save_for_backward`` of a custom Function, and every built-in op's saved
inputs and outputs) passes through the pack hook. What it costs in memory is the storage behind it, counted once
however many saved tensors view it: a chain of blocks that saves each block's output as the next block's input
keeps one storage. The storages of ``exclude`` (a module's parameters: the module holds them anyway) are left out
of ``nbytes`` and reported apart. Tensors stashed on a Function's ``ctx`` as attributes are invisible here, as they
are to ``save_on_cpu``: that is why everything a backward reads must be saved.

What counts is what is still kept when the forward returns: a graph built and dropped inside it (a saved tensor
freed, its memory perhaps reused by a later one) keeps nothing. The pack hook holds weak references only, and the
storages are read at the end, when every tensor still kept is alive at once (no address is counted twice).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Kept:
    """What one forward kept for backward."""

    nbytes: int = 0
    """Bytes of the unique storages saved, the excluded ones left out."""
    tensors: int = 0
    """Saved tensors still kept (the excluded ones included): one storage may back several."""
    storages: int = 0
    """Unique storages counted in ``nbytes``."""
    excluded_nbytes: int = 0
    """Bytes of the saved storages that belong to ``exclude``."""
    by_dtype: dict[str, int] = field(default_factory=dict)
    """``nbytes`` by the dtype of the first saved tensor seen on each storage."""

    def ratio(self, other: Kept) -> float:
        return self.nbytes / other.nbytes if other.nbytes else float("inf") if self.nbytes else 1.0


def _key(t: Tensor) -> tuple[Any, ...]:
    storage = t.untyped_storage()
    # An empty storage has no address of its own: count none of them (they hold no bytes).
    return (t.device, storage.data_ptr()) if storage.nbytes() else ("empty",)


def kept_for_backward(forward: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[Any, Kept]:
    """``(forward(), what it kept)``. Run only the forward inside: the backward then frees what was kept."""
    packed: list[weakref.ref[Tensor]] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    excluded = {_key(t) for t in exclude}
    kept = Kept()
    seen: set[tuple[Any, ...]] = set()
    for ref in packed:
        t = ref()
        if t is None:  # freed with a graph dropped inside the forward
            continue
        kept.tensors += 1
        key = _key(t)
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        if key in excluded:
            kept.excluded_nbytes += nbytes
        elif nbytes:
            kept.nbytes += nbytes
            kept.storages += 1
            name = str(t.dtype).removeprefix("torch.")
            kept.by_dtype[name] = kept.by_dtype.get(name, 0) + nbytes
    return result, kept


def kept_by_module(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, Kept]:
    """``(module(x), what it kept)``, the module's parameters excluded."""
    return kept_for_backward(lambda: module(x), exclude=list(module.parameters()))
