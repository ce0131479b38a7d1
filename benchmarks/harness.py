"""How one benchmark case is built, checked and measured (``run_case``).

1. Modules (``impls.py``): the eager reference from one seed; every other implementation loads its state_dict (or
   shares its weights), so all compute the same function.
2. Inputs: rotated among enough copies to leave the last-level cache (L2 on CUDA), fixed ``dout`` per copy.
3. Parity before timing (``checks.py``): over ``PARITY_TOLERANCE`` the benchmark fails.
4. Memory: peak CUDA memory of one step; on CPU the bytes the training step saves for backward.
5. Timing (``clocks.py``): warm-up calls absorb compilation, autotuning and CUDA-graph recording;
   pytest-benchmark times ``step + synchronize``; on CPU each implementation is also timed in alternation with the
   eager reference (the paired ratio, with its interquartile range). On CUDA, wall (``do_bench``), host and GPU
   time (wall time = host time + the GPU time the host could not hide).
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from . import clocks
from .cases import ELEMENT_BYTES, FFN_HIDDEN, REFERENCE, Case, work
from .checks import check_parity, clear_grads, peak_cuda_bytes, saved_tensor_bytes
from .clocks import TORCH_DTYPES
from .env_info import device_name, route_name
from .impls import SEED, build_impl, build_reference, module_runner

MAX_COPIES = 256  # rotated input sets
DEFAULT_SECONDS = {"cpu": 1.0, "cuda": 0.25}  # CUDA: do_bench, host and GPU clocks follow the pytest timing


@dataclass(frozen=True)
class Settings:
    seconds: float | None = None  # timed seconds per benchmark; None: DEFAULT_SECONDS of the device


def cache_bytes(device: torch.device) -> int:
    """Size of the cache the inputs must leave: L2 on CUDA, the last-level cache of CPU 0 elsewhere."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return 32 << 20


def input_set_bytes(case: Case) -> int:
    """Bytes one rotated input set holds: x, and in training dout and the gradient x keeps."""
    return case.rows * case.width * ELEMENT_BYTES[case.dtype] * (3 if case.mode != "forward" else 1)


def rotation_copies(case: Case, budget: int) -> int:
    per_set = input_set_bytes(case)
    want = math.ceil(3 * cache_bytes(torch.device(case.device)) / per_set)
    return max(1, min(want, MAX_COPIES, budget // per_set))


def make_inputs(case: Case, copies: int) -> list[tuple[Tensor, Tensor | None]]:
    generator = torch.Generator(device=case.device)
    generator.manual_seed(SEED + 1)
    factory = {"device": case.device, "dtype": TORCH_DTYPES[case.dtype], "generator": generator}
    inputs = []
    for _ in range(copies):
        x = torch.randn(case.rows, case.width, **factory)
        dout = None
        if case.mode == "train":
            x.requires_grad_(True)
            dout = torch.randn(case.rows, case.width, **factory)
        elif case.mode == "train-sum":  # the gradient out.sum().backward() hands the block: ones, expanded
            x.requires_grad_(True)
            dout = torch.ones((), device=case.device, dtype=TORCH_DTYPES[case.dtype]).expand(case.rows, case.width)
        inputs.append((x, dout))
    return inputs


def working_set_bytes(case: Case) -> int:
    """A generous estimate of what one step allocates besides the inputs (compiled variants included)."""
    activation = case.rows * case.width * ELEMENT_BYTES[case.dtype]
    layers = case.blocks + 1 if case.blocks else 1
    return activation * (4 + (8 * layers if case.mode != "forward" else 2)) + 8 * case.width**2 * layers * 4



def backend_name(case: Case) -> str:
    """The route the fused modules take for this case's inputs (e.g. "triton:whole_block", "torch", "composite")."""
    hidden = FFN_HIDDEN * case.width if case.ffn else case.width
    return route_name(case.device, TORCH_DTYPES[case.dtype], case.rows, case.width, hidden, case.ffn,
                      case.mode != "forward")


def run_case(case: Case, benchmark: Any, settings: Settings) -> None:
    """Build, check, measure and time ``case``; everything measured goes to ``benchmark.extra_info``.

    With benchmarks disabled (smoke mode) the case is built, checked and run once, nothing is timed.
    """
    timing = benchmark.enabled
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    info = benchmark.extra_info
    benchmark.group = case.group
    flops, nbytes = work(case)
    info.update(impl=case.impl, device=device.type, device_name=device_name(case.device), dtype=case.dtype,
                mode=case.mode, kind=case.kind, rows=case.rows, width=case.width, blocks=case.blocks,
                flops=flops, bytes=nbytes)
    if case.impl == "fused":
        info["backend"] = backend_name(case)
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine makes timings noisy

    budget = 512 << 20
    if cuda:
        # Free what earlier cases left: CUDA-graph pools (held by dynamo) and the allocator's cache.
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(1 << 30, free // 8)
        need = working_set_bytes(case) + input_set_bytes(case)
        if need > 0.7 * free:
            pytest.skip(f"{case.id}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        if timing:
            info["ceilings"] = clocks.measure_ceilings(case.device)

    reference = build_reference(case)
    compile_counts_before = clocks.compile_counts()
    impl = build_impl(case, reference)
    inputs = make_inputs(case, rotation_copies(case, budget) if timing else 1)
    info["rotated_inputs"] = len(inputs)
    x0, dout0 = inputs[0]

    # Parity first (for compiled variants this call compiles): a fast wrong answer fails here.
    if impl.checks_parity:
        errors = check_parity(case, impl, reference, x0, dout0)
        info["parity"] = errors
        info["parity_out"] = errors["out"]
    # CPU: the eager reference again, to time in alternation with this implementation (see clocks.paired_timing).
    paired_reference = None
    if not cuda and timing and impl.checks_parity and case.impl != REFERENCE:
        twin = copy.deepcopy(reference)
        paired_reference = module_runner(twin, twin, case.mode)
    del reference

    cycle = itertools.cycle(inputs)

    def step() -> Tensor:
        x, dout = next(cycle)
        return impl.run(x, dout)

    def timed() -> None:
        step()
        if cuda:
            torch.cuda.synchronize()

    warmup = 5 if impl.compiled else 3
    for _ in range(warmup if timing else 1):
        timed()
    if impl.compiled:  # after the warm-up: the backward graph compiles at the first backward
        counts = clocks.compile_counts()
        info.update({name: counts[name] - compile_counts_before[name] for name in counts})
        assert info["compiled_graphs"] > 0, f"{case.id}: torch.compile captured no graph"

    clear_grads(impl.module, inputs)
    if cuda:
        info["peak_bytes"] = peak_cuda_bytes(impl.run, x0, dout0)
        if case.impl == "max-autotune":
            info["peak_bytes_note"] = "CUDA-graph pool allocated while recording, not counted"
    elif case.mode != "forward" and impl.module is not None:
        info.update(saved_tensor_bytes(impl.run, impl.module, x0, dout0))

    if not timing:
        benchmark.pedantic(timed, rounds=1, iterations=1)  # disabled: runs once
        return
    seconds = settings.seconds or DEFAULT_SECONDS[device.type]
    rounds = clocks.choose_rounds(timed, seconds)
    info["rounds"] = rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    if cuda:
        info.update(clocks.do_bench_ms(step))
        info.update(clocks.host_time(step))
        info.update(clocks.gpu_time(step))
    if paired_reference is not None:
        info.update(clocks.paired_timing(paired_reference, impl.run, inputs, seconds))
