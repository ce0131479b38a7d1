"""Deterministic cross-program sums inside one launch, without float atomics: arrival counters and slots.

Used where several programs of a launch each hold an fp32 partial of one result (split-K weight gradients, the
whole-block backward's per-program weight gradients) and the result must be their sum, the same bits every run.

Protocol (``sum_slots_in_order``). ``count`` programs each write their partial, ``SLOT`` fp32 elements, to slot
``index`` of a workspace, then arrive. Programs are split into ``groups = cdiv(count, group)`` groups of
``group`` consecutive slots. Arriving increments the group's int32 counter (an integer atomic, acq_rel, after a
barrier so that every thread's stores are released); the program that sees ``size - 1`` arrived last: it sums its
group's slots in index order into slot ``count + group_index``, resets the counter to 0, and arrives at the final
counter; the last group to arrive sums the group slots in index order into slot ``count + groups`` (the total)
and is the one program that gets True back. Every sum runs in slot order whoever arrives when: the result is
deterministic. The longest serial chain is ``group + groups`` slot reads (~2 sqrt(count) with the hosts'
``group = ceil(sqrt(count))``) instead of ``count`` for a single last program. Reads of other programs' slots
bypass L1 (``.cg``), after the acquiring atomic. Workspace layout: ``count + groups + 1`` slots; counters:
``groups + 1`` int32 that are 0 before the launch, and 0 again after it.

Counter buffers (``arrival_counters``): one cached, zero-initialised int32 buffer per (device, stream) on CUDA,
per (device, thread) for the interpreter. Self-cleaning: the last arriver of every counter resets it, so a launch
leaves the buffer as it found it (all 0) and the next launch needs no memset. Why this is safe:

- Launches on one stream run in order, so two launches never use a counter at the same time; a launch on
  another stream gets that stream's own buffer (launches on two streams may overlap). The interpreter runs a
  launch to its end in the calling thread; other threads get their own buffer.
- A buffer outgrown by a bigger launch is replaced and freed by the caching allocator in stream order (after the
  launches that used it).
- CUDA-graph capture (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``): a captured launch gets a
  fresh zeroed buffer (``torch.zeros``, captured as a memset node that re-zeroes it at every replay, from the
  graph's private memory pool), never the cached one: a graph may be replayed on any stream, concurrently with
  eager work or with another graph, so it cannot share a buffer with them.
- A launch that stops midway leaves counters set. Under the interpreter that is an exception raised while its
  programs run (Ctrl-C, an interpreter error): the wrappers launch inside ``reset_on_failure``, which zeroes the
  counters again. On a GPU it is a device fault, and a CUDA context that faulted cannot run kernels again anyway.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import _common

_COUNTERS: dict[tuple, torch.Tensor] = {}


def group_size(count: int) -> int:
    """Slots per group for ``count`` partials: ceil(sqrt(count)) minimises the serial chain ``group + groups``;
    up to 8 partials form one group (a second level would save at most a few slot reads)."""
    return count if count <= 8 else math.isqrt(count - 1) + 1


def counters_needed(count: int) -> int:
    """Counters one ``sum_slots_in_order`` reduction uses: one per group plus the final one."""
    return -(-count // group_size(count)) + 1


def workspace_slots(count: int) -> int:
    """Slots one reduction of ``count`` partials uses: the partials, one per group, the total."""
    return count + counters_needed(count)


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 counters, all 0, for one launch on the current stream of ``device`` (see the
    module docstring for why a cached buffer is safe, and when a fresh one is used instead)."""
    if _common.is_gpu(device):
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(count, dtype=torch.int32, device=device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (device.type, index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (device.type, device.index, threading.get_ident())
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < count:
        size = max(count, 1024, 2 * buffer.numel() if buffer is not None else 0)
        buffer = _COUNTERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buffer


@contextlib.contextmanager
def reset_on_failure(counters: torch.Tensor | None) -> Iterator[None]:
    """Run a launch that uses ``counters`` (None: none); if it raises, zero them: some programs may have arrived,
    and the next launch would take an early program for the last one."""
    try:
        yield
    except BaseException:
        if counters is not None:
            counters.zero_()
        raise


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Count this program's arrival; True in the program that arrives last of ``arrivals`` (which resets the
    counter to 0). The barrier puts every thread's earlier stores before the releasing atomic."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def _sum_slots(ws_ptr, first, size, target, SLOT: tl.constexpr, CHUNK: tl.constexpr):
    """Slot ``target`` = sum of slots ``first .. first + size - 1``, added in that order."""
    offs = tl.arange(0, CHUNK)
    for start in range(0, SLOT, CHUNK):
        mask = offs < SLOT - start
        total = tl.zeros((CHUNK,), dtype=tl.float32)
        for s in range(first, first + size):
            total += tl.load(ws_ptr + tl.cast(s, tl.int64) * SLOT + start + offs, mask=mask, other=0.0,
                             cache_modifier=".cg")
        tl.store(ws_ptr + tl.cast(target, tl.int64) * SLOT + start + offs, total, mask=mask)


@triton.jit
def sum_slots_in_order(ws_ptr, counters_ptr, index, count, group, SLOT: tl.constexpr, CHUNK: tl.constexpr):
    """Call after storing this program's partial in slot ``index`` (of ``count``). True in exactly one program,
    the last to arrive, once slot ``count + cdiv(count, group)`` holds the sum of the ``count`` slots in index
    order (the module docstring gives the protocol). ``counters_ptr``: ``cdiv(count, group) + 1`` zeroed int32."""
    groups = tl.cdiv(count, group)
    group_index = index // group
    first = group_index * group
    done = last_to_arrive(counters_ptr + group_index, min(group, count - first))
    if done:
        # With one group its sum is the total: written straight to the total's slot.
        _sum_slots(ws_ptr, first, min(group, count - first), count + tl.where(groups > 1, group_index, groups),
                   SLOT, CHUNK)
        if groups > 1:
            done = last_to_arrive(counters_ptr + groups, groups)
            if done:
                _sum_slots(ws_ptr, count, groups, count + groups, SLOT, CHUNK)
        tl.debug_barrier()  # the total, written by all threads, is read back by all threads
    return done
