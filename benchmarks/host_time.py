"""Host (CPU-side) time of a cached call, the fused block's Triton routes against the eager reference block, on any
CPU: ``python -m benchmarks.host_time [--quick] [--jsonl PATH]`` (``--show PATH`` prints a saved run's table).

On a GPU the host issues work and the GPU runs it; when a call's host time exceeds its GPU time, the host time is
the wall time. This measures the host side alone, without a GPU, so that every change to the call path can be
measured where it is made.

Method:

- Fused: ``FusedResidualBlock`` on ``meta`` tensors (shapes and strides, no data) inside ``fake_gpu()``
  (``benchmarks/fake_gpu.py``): everything the package and Triton do in Python per call runs; only the C launch
  (a no-op: a C call while timed, one that counts while counted), the driver's C utilities, ``torch.cuda``'s C
  entry points and the autotuner's timing (the first candidate after the prune) are replaced, and the kernels are
  really compiled for sm_90. Routes are forced
  with ``FUSED_RESIDUAL_BACKEND``: ``whole_block`` is ``triton`` (the whole-block kernels where they take the
  block: forward to width 256, backward to 128 on sm_90, else the two-GEMM kernels), ``two_gemm`` is
  ``triton:two_gemm``. The ``floor`` route (``--routes ...,floor``) is not the package: a Python autograd.Function
  that does only what any such design must do per call (``benchmarks/host_floor.py``), its ratio the lowest one
  a fused block built on a Python Function can reach here.
- Eager: the reference ``ResidualBlock`` on meta tensors, with PyTorch's C++ meta kernels (for both blocks, the
  Python meta registrations are unregistered wherever a C++ kernel serves meta tensors,
  ``fake_gpu.prefer_cpp_meta_kernels``); each implementation's Python calls are counted and a frame of
  PyTorch's Python meta code fails the run.
- Calls: forward (``block(x)`` with autograd off) and a training step (``block(x).sum().backward()``, with ``x``
  and every parameter requiring grad and their gradients set to None before each step, outside the clock). bf16,
  65536 rows (the H200 measurement's; on meta tensors the row count moves only grids and workspace sizes).
- Cached calls: each implementation runs 3 times first (compiles, autotuning, route and launch caches). Then
  ``rounds`` rounds, interleaved: in each round every implementation of the case (eager, whole-block, two-GEMM, in
  an order that rotates by round) makes one untimed call and ``inner`` timed ones (``perf_counter_ns`` around each
  call, the garbage collector off). Reported: the median and the interquartile range over all timed calls (a
  call that the scheduler preempts, for milliseconds on a busy machine, lands in the tail, not in the median).
- Counts (``host_counts.py``, each on one call of its own): Triton launches (checked against the fake GPU's C
  launches), aten ops and the ones that launch work, tensors allocated, Python frames entered (of them the
  package's) and C calls. ``estimate = host + 3 us x launches``: 3 us stands for each launch's C launcher and
  driver call on a GPU host, which this does not run.

Caveats: it does not see the CUDA caching allocator, the C launcher (Triton's parses ~50 arguments and calls
``data_ptr`` per tensor; aten's kernel launches), cuBLAS heuristics (and its extra kernels, e.g. split-K
reductions), or the hand-off of ``backward()`` to the autograd device thread (on meta tensors backward runs on the
calling thread). An allocation here is a new tensor, however the allocator serves it. While timed, the fake C launch
is a C no-op (``FakeGpu.uncounted``: no Python frame, as eager's meta launches pay none); results before
2026-12-05's ``uncounted`` paid a Python call per launch (0.3-0.7 us). CPUs differ: the GPU host's per-call costs
may be several times this machine's, so ratios carry over better than microseconds; ``benchmarks/gpu_check.sh``
runs this on the GPU host beside the real clocks. Other processes on the machine move the times (not the counts):
compare ratios from one run.

Output: a table (stdout) and, with ``--jsonl PATH``, one JSON line per case (route x mode x width), appended as it
finishes: ``{"type": "host_time", "case", "mode", "route", "backend", "width", "rows", "dtype", "fused": {...},
"eager": {...}, "fused_over_eager": {"host", "estimate"}, "method", "environment"}``, where ``fused``/``eager``
hold ``host_us`` (median, q1, q3, calls), ``launches`` (triton, aten, total), ``triton_launches``,
``aten_launches``, ``allocations``, ``estimate_us``, ``calls`` (python, c, package) and ``package_functions``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fused_residual as fr

from . import cli, host_counts, records
from .fake_gpu import FakeGpu, fake_gpu, prefer_cpp_meta_kernels
from .host_floor import FloorBlock

ROUTES = {"whole_block": "triton", "two_gemm": "triton:two_gemm"}
FLOOR = "floor"  # not the package: a do-nothing Python autograd.Function in the block's place (host_floor.py)
MODES = ("forward", "train")
LAUNCH_US = 3.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Impl:
    """One implementation of a case: a step to time and a setup (not timed) before each step."""

    name: str
    backend: str | None  # FUSED_RESIDUAL_BACKEND while it runs (None: eager, which does not read it)
    step: Callable[[], Any]
    setup: Callable[[], Any]

    def use(self) -> None:
        if self.backend is not None:
            os.environ[fr.BACKEND_ENV_VAR] = self.backend

    def call(self) -> None:
        self.setup()
        self.step()


def _nothing() -> None:
    pass


def _clear_grads(leaves: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def setup() -> None:
        for t in leaves:
            t.grad = None

    return setup


def _train_step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module(x).sum().backward()

    return step


def make_impls(mode: str, width: int, rows: int, dtype: torch.dtype, routes: list[str]) -> list[Impl]:
    """Eager first, then the fused block under each route, on meta tensors of one shape."""
    modules = [("eager", None, fr.ResidualBlock(width, width).to(device="meta", dtype=dtype))]
    for route in routes:
        if route == FLOOR:
            modules.append((route, None, FloorBlock(width, device="meta", dtype=dtype)))
        else:
            modules.append((route, ROUTES[route], fr.FusedResidualBlock(width, width, device="meta", dtype=dtype)))
    impls = []
    for name, backend, module in modules:
        x = torch.empty(rows, width, device="meta", dtype=dtype, requires_grad=mode == "train")
        if mode == "forward":
            impls.append(Impl(name, backend, functools.partial(module, x), _nothing))
        else:
            impls.append(Impl(name, backend, _train_step(module, x), _clear_grads((x, *module.parameters()))))
    return impls


def time_interleaved(impls: list[Impl], rounds: int, inner: int) -> dict[str, list[float]]:
    """Per implementation, the host time of every timed call (us); implementations interleaved by round."""
    samples: dict[str, list[float]] = {impl.name: [] for impl in impls}
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                impl.use()
                impl.call()  # untimed: a route switch re-reads the environment variable once
                setup, step, times = impl.setup, impl.step, samples[impl.name]
                for _ in range(inner):
                    setup()
                    start = clock()
                    step()
                    times.append((clock() - start) / 1e3)
    finally:
        gc.enable()
    return samples


def _spread(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3, "calls": len(values)}


def count(impl: Impl, gpu: FakeGpu) -> dict[str, Any]:
    """The deterministic counts of one cached call of ``impl``; fails if Python meta code ran or if the launches
    counted differ from the C launches the fake GPU saw."""
    impl.use()
    gpu.reset()
    counts = host_counts.count_call(impl.step, impl.setup)
    calls, work = counts.calls, counts.work
    if calls.python_meta:
        raise RuntimeError(f"{impl.name}: {calls.python_meta} frames of PyTorch's Python meta code ran in one call")
    triton = sum(work.triton_launches.values())
    if sum(gpu.launches.values()) != 3 * triton:  # the warm-up call, then one call per instrument
        raise RuntimeError(f"{impl.name}: {dict(gpu.launches)} C launches in three calls, {triton} counted in one")
    aten = sum(work.aten_launches.values())
    return {"launches": {"triton": triton, "aten": aten, "total": triton + aten},
            "triton_launches": work.triton_launches, "aten_launches": work.aten_launches,
            "allocations": work.allocations,
            "calls": {"python": calls.python, "c": calls.c, "package": calls.package},
            "package_functions": calls.by_function}


def measure_case(gpu: FakeGpu, mode: str, width: int, rows: int, dtype: str, routes: list[str], rounds: int,
                 inner: int, profile: int = 0) -> list[dict[str, Any]]:
    """One record per route: the fused route and the eager block measured in the same interleaved run."""
    impls = make_impls(mode, width, rows, DTYPES[dtype], routes)
    with torch.set_grad_enabled(mode == "train"):
        for impl in impls:
            impl.use()
            for _ in range(3):
                impl.call()
        counted = {impl.name: count(impl, gpu) for impl in impls}
        with gpu.uncounted():  # the C launch a C no-op: timed calls pay nothing for it
            samples = time_interleaved(impls, rounds, inner)
            if profile:
                for impl in impls[1:]:
                    print(profile_table(impl, profile, f"{mode} w{width} {impl.name}"))
    results = {}
    for impl in impls:
        info = {"host_us": _spread(samples[impl.name]), **counted[impl.name]}
        info["estimate_us"] = info["host_us"]["median"] + LAUNCH_US * info["launches"]["total"]
        results[impl.name] = info
    eager = results["eager"]
    return [{"type": "host_time", "case": f"{mode}-{dtype}-{rows}x{width}-{route}", "mode": mode, "route": route,
             "backend": ROUTES.get(route), "width": width, "rows": rows, "dtype": dtype, "fused": results[route],
             "eager": eager,
             "fused_over_eager": {"host": results[route]["host_us"]["median"] / eager["host_us"]["median"],
                                  "estimate": results[route]["estimate_us"] / eager["estimate_us"]}}
            for route in routes]


def profile_table(impl: Impl, calls: int, title: str, top: int = 15, batches: int = 11) -> str:
    """cProfile's view of ``batches`` batches of ``calls`` cached calls: per function, the median over batches of
    its own and cumulative time per call (a batch the scheduler preempted does not move the median), the
    functions with the most own time first. cProfile's overhead inflates small functions: read it for shares."""
    import cProfile
    import pstats

    impl.use()
    own: dict[tuple, list[float]] = {}
    cumulative: dict[tuple, list[float]] = {}
    ncalls: dict[tuple, float] = {}
    for _ in range(batches):
        profiler = cProfile.Profile()
        for _ in range(calls):
            impl.setup()
            profiler.enable()
            impl.step()
            profiler.disable()
        for key, (_, n, tt, ct, _) in pstats.Stats(profiler).stats.items():
            own.setdefault(key, []).append(tt / calls * 1e6)
            cumulative.setdefault(key, []).append(ct / calls * 1e6)
            ncalls[key] = n / calls
    median = {key: statistics.median(v + [0.0] * (batches - len(v))) for key, v in own.items()}
    lines = [f"-- profile: {title} (medians over {batches} x {calls} calls; us per call: own, cumulative; calls "
             "per call)"]
    for key in sorted(median, key=median.get, reverse=True)[:top]:
        file, line, name = key
        where = f"{os.path.basename(file)}:{line}" if file != "~" else "C"
        lines.append(f"  {median[key]:7.2f} {statistics.median(cumulative[key]):8.2f} {ncalls[key]:6.1f}  "
                     f"{name} ({where})")
    return "\n".join(lines)


def _cell(info: dict[str, Any]) -> list[str]:
    host, launches, calls = info["host_us"], info["launches"], info["calls"]
    return [f"{host['median']:.1f} [{host['q1']:.1f}-{host['q3']:.1f}]",
            f"{launches['total']} ({launches['triton']}+{launches['aten']})", str(info["allocations"]),
            f"{info['estimate_us']:.1f}", f"{calls['package']} {calls['python']} {calls['c']}"]


HEADER = ["case", "impl", "host us [IQR]", "launches (triton+aten)", "allocs", "host+3us*launches", "fused/eager",
          "calls: package python C"]


def table(found: list[dict[str, Any]]) -> str:
    """The records as an aligned text table; eager once per mode and width, then each route with its ratios."""
    rows, seen = [], set()
    for r in found:
        case = f"{r['mode']} {r['dtype']} {r['rows']}x{r['width']}"
        if case not in seen:
            seen.add(case)
            rows.append([case, "eager", *_cell(r["eager"])[:4], "", _cell(r["eager"])[4]])
        ratio = r["fused_over_eager"]
        rows.append([case, r["route"], *_cell(r["fused"])[:4], f"{ratio['host']:.2f}x ({ratio['estimate']:.2f}x)",
                     _cell(r["fused"])[4]])
    widths = [max(len(str(row[i])) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [HEADER, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def measure_in_subprocess(*args: str, timeout: float = 600) -> tuple[list[dict[str, Any]], str]:
    """``python -m benchmarks.host_time ARGS --jsonl TMP`` in a fresh process (without ``TRITON_INTERPRET`` or
    ``FUSED_RESIDUAL_BACKEND``): ``(its records, its output)``, RuntimeError with the output if it failed. For tests
    that assert counts from a pytest process (which runs the interpreter): e.g. ``measure_in_subprocess("--widths",
    "64", "--rounds", "1", "--inner", "1")``."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", fr.BACKEND_ENV_VAR)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "host_time.jsonl"
        done = subprocess.run([sys.executable, "-m", "benchmarks.host_time", *args, "--jsonl", str(out)], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks.host_time {' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}")
        return [r for r in records.read(out)[0] if r.get("type") == "host_time"], done.stdout


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpWithDefaults)
    p.add_argument("--quick", action="store_true", help="5 rounds of 10 calls (default: 30 of 20)")
    p.add_argument("--rounds", type=cli.positive(int), help="interleaved rounds per case (default: 30, --quick 5)")
    p.add_argument("--inner", type=cli.positive(int),
                   help="timed calls per implementation and round (default: 20, --quick 10)")
    p.add_argument("--modes", type=cli.choices_of(MODES), default=list(MODES),
                   help=f"comma-separated, of {', '.join(MODES)} (default: {','.join(MODES)})")
    p.add_argument("--routes", type=cli.choices_of((*ROUTES, FLOOR)), default=list(ROUTES),
                   help=f"comma-separated fused routes, of {', '.join(ROUTES)} (default: {','.join(ROUTES)}); "
                        f"{FLOOR}: the floor of any design on a Python autograd.Function")
    p.add_argument("--widths", type=cli.positive_ints, default=[64, 256],
                   help="comma-separated block widths (default: 64,256)")
    p.add_argument("--rows", type=cli.positive(int), default=65536, help="rows of the input")
    p.add_argument("--dtype", type=cli.short_dtype, default="bf16", metavar=cli.DTYPE_METAVAR,
                   help="dtype of the block (default: bfloat16)")
    p.add_argument("--jsonl", help="append one JSON line per case to this file")
    p.add_argument("--show", metavar="PATH", help="print the table of a JSON-lines file written by --jsonl; no run")
    p.add_argument("--profile", type=cli.positive(int), default=0, metavar="CALLS",
                   help="also print cProfile's top functions per fused route (11 batches of CALLS calls; "
                        "default: no profile)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (5 if args.quick else 30)
    args.inner = args.inner or (10 if args.quick else 20)
    if args.show and not Path(args.show).is_file():
        p.error(f"--show {args.show}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.show:
        print(table([r for r in records.read(args.show)[0] if r.get("type") == "host_time"]))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("benchmarks.host_time measures the launch path of compiled kernels: unset TRITON_INTERPRET",
              file=sys.stderr)
        return 2
    from .env_info import describe

    environment = describe()
    method = {"rounds": args.rounds, "inner": args.inner, "launch_us": LAUNCH_US, "autotuner": "first candidate",
              "device": "fake H200 (sm_90, 132 SMs)", "cpu_meta_kernels": "C++"}
    print(f"host time per cached call: {args.dtype}, {args.rows} rows, fake H200 (sm_90, 132 SMs, kernels compiled "
          f"for sm_90), autotuner takes the first candidate; eager and fused interleaved, {args.rounds} rounds x "
          f"{args.inner} calls, medians [IQR]; torch {torch.__version__}, triton {environment.get('triton')}, "
          f"{environment.get('cpu')}", flush=True)
    previous = os.environ.get(fr.BACKEND_ENV_VAR)
    found: list[dict[str, Any]] = []
    try:
        dropped = prefer_cpp_meta_kernels()
        print(f"({len(dropped)} Python meta kernels unregistered: C++ serves those ops on meta tensors)")
        with fake_gpu() as gpu:
            if gpu.temporary:
                print(f"(temporary patches for device tests outside kernels/_common.py: {', '.join(gpu.temporary)})")
            progress = cli.Progress("host time", len(args.widths) * len(args.modes))
            for width in args.widths:
                for mode in args.modes:
                    new = measure_case(gpu, mode, width, args.rows, args.dtype, args.routes, args.rounds, args.inner,
                                       args.profile)
                    for record in new:
                        record["method"], record["environment"] = method, environment
                        if args.jsonl:
                            records.append(args.jsonl, record)
                    found += new
                    progress.step(f"{mode} w{width}")
    finally:
        if previous is None:
            os.environ.pop(fr.BACKEND_ENV_VAR, None)
        else:
            os.environ[fr.BACKEND_ENV_VAR] = previous
        if found:
            print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
