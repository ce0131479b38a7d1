"""The clocks a benchmark case is read on, each with its spread (interquartile range) and round count.

- rounds: how many timed rounds fill the requested seconds (``choose_rounds``);
- alternated (CPU): the eager reference and an implementation timed A B B A ..., per-pair ratios summarized by
  pytest-benchmark's ``Stats`` (``paired_timing``);
- wall (CUDA): ``triton.testing.do_bench`` of the whole Python call, CUDA events with L2 flushed (``do_bench_ms``);
- host (CUDA): ``perf_counter`` around calls without synchronizing (``host_time``);
- GPU (CUDA): kernel times summed by torch.profiler (``gpu_time``, ``device_time_summary``);
- the card's ceilings, once per session (``measure_ceilings``), and torch.compile's counters (``compile_counts``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pytest_benchmark.stats import Stats
from torch import Tensor

MIN_ROUNDS, MAX_ROUNDS = 5, 5000
HOST_CALLS = 30  # calls timed without synchronizing
PROFILED_CALLS = 20  # calls under torch.profiler for the GPU clock
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Runner = Callable[[Tensor, "Tensor | None"], Tensor]


def summarize(values: Iterable[float]) -> Stats:
    """pytest-benchmark's statistics (median, q1, q3, iqr, rounds, ...) of ``values``."""
    stats = Stats()
    for value in values:
        stats.update(value)
    return stats


def choose_rounds(timed: Callable[[], object], seconds: float) -> int:
    """Rounds that fill ``seconds``, from the median of a few calls (one slow call must not decide)."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (len(samples) < 50 and time.perf_counter() - start < 0.1 * seconds):
        t0 = time.perf_counter()
        timed()
        samples.append(time.perf_counter() - t0)
    per_call = sorted(samples)[len(samples) // 2]
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, seconds / max(per_call, 1e-9))))


def paired_timing(reference: Runner, impl: Runner, inputs: list[tuple[Tensor, Tensor | None]],
                  seconds: float) -> dict[str, float]:
    """The eager reference and ``impl`` timed in alternation (A B B A ...): load from other processes that comes
    and goes hits both alike. Returns each side's median and the per-pair ratios' median, quartiles and count."""
    cycle = itertools.cycle(inputs)
    ref_times: list[float] = []
    impl_times: list[float] = []

    def once(run: Runner, into: list[float]) -> None:
        x, dout = next(cycle)
        t0 = time.perf_counter()
        run(x, dout)
        into.append(time.perf_counter() - t0)

    start = time.perf_counter()
    while len(ref_times) < MIN_ROUNDS or (time.perf_counter() - start < seconds and len(ref_times) < MAX_ROUNDS):
        first, second = ((reference, ref_times), (impl, impl_times))[:: 1 if len(ref_times) % 2 == 0 else -1]
        once(*first)
        once(*second)
    ratios = summarize(r / i for r, i in zip(ref_times, impl_times, strict=True))
    return {
        "paired_rounds": ratios.rounds,
        "paired_eager_s": summarize(ref_times).median,
        "paired_impl_s": summarize(impl_times).median,
        "paired_eager_over_impl": ratios.median,
        "paired_ratio_q1": ratios.q1,
        "paired_ratio_q3": ratios.q3,
    }


def host_time(step: Callable[[], object], calls: int = HOST_CALLS,
              synchronize: Callable[[], object] = torch.cuda.synchronize) -> dict[str, float]:
    """Host time per call: ``perf_counter`` around ``calls`` calls without synchronizing (the host's own cost:
    Python, dispatch, launches, as long as the GPU's queue does not fill), and the same span closed by a
    synchronize (the GPU's backlog included)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    issued = time.perf_counter()
    synchronize()
    done = time.perf_counter()
    return {"host_ms": (issued - start) * 1e3 / calls, "host_sync_ms": (done - start) * 1e3 / calls,
            "host_calls": calls}


# Device activities that are not kernels: copies and fills (profiler names "Memcpy ..." and "Memset ...").
_NOT_KERNELS = ("Memcpy", "Memset")
# Host-side launch API calls (runtime and driver; CUDA graphs launch many kernels with one call).
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchCooperative")


def device_time_summary(events: Iterable[Any], calls: int) -> dict[str, float | int | None]:
    """GPU time and launches per call from torch.profiler events of ``calls`` calls.

    ``gpu_ms``: the sum of the durations of every device event (kernels, memcpy, memset), so kernels that
    overlapped would count twice (the suite runs on one stream); ``kernels_per_call``: device events that are
    kernels; ``launch_calls_per_call``: host launch API calls (runtime and driver) the profiler saw. None where the
    profiler saw no device activity at all (a GPU clock of 0 would be a wrong number, not a fast kernel)."""
    from torch.autograd import DeviceType

    total_us = 0.0
    device_ops = kernels = launches = 0
    for event in events:
        if event.device_type == DeviceType.CUDA:
            total_us += event.time_range.end - event.time_range.start
            device_ops += 1
            kernels += not event.name.startswith(_NOT_KERNELS)
        elif event.name.startswith(_LAUNCH_CALLS):
            launches += 1
    if device_ops == 0:
        return {"gpu_ms": None, "kernels_per_call": None, "device_ops_per_call": None,
                "launch_calls_per_call": None, "profiled_calls": calls,
                "gpu_note": "torch.profiler recorded no device activity"}
    return {"gpu_ms": total_us * 1e-3 / calls, "kernels_per_call": kernels / calls,
            "device_ops_per_call": device_ops / calls, "launch_calls_per_call": launches / calls,
            "profiled_calls": calls}


def gpu_time(step: Callable[[], object], calls: int = PROFILED_CALLS) -> dict[str, float | int | str | None]:
    """GPU time per call (``device_time_summary``) of ``calls`` calls under torch.profiler. A profiler that cannot
    run (no CUPTI, say) leaves a note instead of failing the benchmark."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                step()
            torch.cuda.synchronize()
        return device_time_summary(prof.events(), calls)
    except Exception as err:  # metadata only: a profiler that cannot start must not fail the benchmark
        return {"gpu_ms": None, "gpu_note": f"torch.profiler failed: {err!r}"[:300]}


def do_bench_ms(step: Callable[[], object]) -> dict[str, float]:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed before each call): median, quartiles and the number
    of timed calls, in ms."""
    from triton.testing import do_bench

    times = do_bench(step, warmup=25, rep=100, return_mode="all")
    if isinstance(times, list | tuple) and times:
        stats = summarize(times)
        return {"do_bench_ms": stats.median, "do_bench_q1_ms": stats.q1, "do_bench_q3_ms": stats.q3,
                "do_bench_rounds": stats.rounds}
    median, q1, q3 = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.25, 0.75])  # a Triton without "all"
    return {"do_bench_ms": median, "do_bench_q1_ms": q1, "do_bench_q3_ms": q3}


_CEILINGS: dict[str, dict[str, object]] = {}


def measure_ceilings(device: str = "cuda") -> dict[str, object]:
    """The card's measured ceilings, once per session: a 1 GiB device-to-device copy (bytes read + written)
    and 8192^3 matrix products per dtype, each a do_bench median."""
    if device in _CEILINGS:
        return _CEILINGS[device]
    from triton.testing import do_bench

    from .env_info import device_name

    def copy_ms(nbytes: int) -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        return do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")

    def matmul_ms(n: int, dtype: torch.dtype) -> float:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        return do_bench(lambda: torch.mm(a, b, out=c), warmup=25, rep=200, return_mode="median")

    nbytes, n = 1 << 30, 8192
    copy_GBps = 2 * nbytes / (copy_ms(nbytes) * 1e-3) / 1e9
    matmul = {name: 2 * n**3 / (matmul_ms(n, dtype) * 1e-3) / 1e12 for name, dtype in TORCH_DTYPES.items()}
    torch.cuda.empty_cache()
    _CEILINGS[device] = {
        "device_name": device_name(device),
        "copy_GBps": copy_GBps,
        "copy_bytes": nbytes,
        "matmul_TFLOPs": matmul,
        "matmul_n": n,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    return _CEILINGS[device]


def measured_ceilings() -> dict[str, dict[str, object]]:
    return dict(_CEILINGS)


def compile_counts() -> dict[str, int]:
    """torch.compile's running totals: graphs captured, graph breaks, CUDA-graph captures Inductor skipped
    (a reduce-overhead case with skips is not running under CUDA graphs)."""
    counters = torch._dynamo.utils.counters
    return {"compiled_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
