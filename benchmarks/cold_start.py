"""``python -m benchmarks.cold_start [--out FILE.jsonl] [--width W ...]``: the first call at a new width.

For each width, three fresh processes share one new, empty Triton cache directory (``TRITON_CACHE_DIR``):

1. ``empty``: the first forward + backward compiles and autotunes every kernel the call needs (with
   ``TRITON_CACHE_AUTOTUNING=1``, so the autotuners' choices are stored in the cache as well as the kernels);
2. ``warm``: the same call in a second process, Triton's default: the kernels the first compiled come from disk,
   but each autotuner benchmarks its candidates again (its choices are not read from disk by default);
3. ``warm_tuned``: a third process with ``TRITON_CACHE_AUTOTUNING=1``: the kernels and the choices from disk, so
   it compiles and benchmarks nothing.

Each process times its import of torch and fused_residual, CUDA's start-up, the first training step
(``FusedResidualBlock`` forward + ``backward(dout)``, synchronized) and a second one (steady state), and checks
that step against the eager reference (``checks.PARITY_TOLERANCE``). The parent adds the whole process's wall
time and the number of compiled kernels (``*.cubin``) in the cache. The cold-start target: the first step of the
empty-cache process <= 20 s on an H100.

Each process's record is printed and, with ``--out``, appended to a JSON-lines file at once (``records.py``,
type ``cold_start``); ``python -m benchmarks.report`` shows them. ``--device cpu`` runs the same plumbing on
the CPU (the torch backend; no Triton compile; the first two processes), for checking this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import cli, records

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("empty", "warm", "warm_tuned")
READS_AUTOTUNE_CACHE = {"empty": True, "warm": False, "warm_tuned": True}  # TRITON_CACHE_AUTOTUNING per process
TARGET_S = 20.0  # the cold-start target: the first forward + backward at a new width, empty cache, on an H100
DEFAULTS = {"cuda": {"dtype": "bf16", "rows": 16384, "widths": [256], "backend": "triton"},
            "cpu": {"dtype": "fp32", "rows": 256, "widths": [64], "backend": "auto"}}


def child(device: str, dtype: str, rows: int, width: int) -> dict[str, Any]:
    """Run in the fresh process: time the imports, the first and a second training step, and check parity."""
    start = time.perf_counter()
    import torch

    import fused_residual as fr

    imported = time.perf_counter()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device).add_(1)
        torch.cuda.synchronize()
    ready = time.perf_counter()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    from .cases import FUSED, Case
    from .checks import PARITY_TOLERANCE, relative_error
    from .clocks import TORCH_DTYPES
    from .env_info import device_name, environment
    from .harness import backend_name
    from .impls import SEED

    factory = {"device": device, "dtype": TORCH_DTYPES[dtype]}
    torch.manual_seed(SEED)
    reference = fr.ResidualBlock(width, width).to(**factory)
    block = fr.FusedResidualBlock(width, width, **factory)
    block.load_state_dict(reference.state_dict())
    x = torch.randn(rows, width, **factory, requires_grad=True)
    dout = torch.randn(rows, width, **factory)
    sync()

    def training_step() -> tuple[float, Any, Any]:
        x.grad = None
        t0 = time.perf_counter()
        out = block(x)
        out.backward(dout)
        sync()
        return time.perf_counter() - t0, out.detach(), x.grad.detach().clone()

    first_s, out, dx = training_step()
    second_s, _, _ = training_step()

    xr = x.detach().clone().requires_grad_(True)
    expected = reference(xr)
    expected.backward(dout)
    out_tol, l2_tol = PARITY_TOLERANCE[(device, dtype)]
    errors = {"out": relative_error(out, expected), "dx_l2": relative_error(dx, xr.grad, "l2")}
    ok = errors["out"] <= out_tol and errors["dx_l2"] <= l2_tol
    return {
        "outcome": "passed" if ok else "failed",
        "message": None if ok else f"differs from the eager reference: {errors}",
        "device_name": device_name(device),
        "backend_used": backend_name(Case(device, dtype, "train", rows, width, FUSED)),
        "import_s": imported - start,
        "cuda_init_s": ready - imported if cuda else None,
        "first_step_s": first_s,
        "second_step_s": second_s,
        "parity": errors,
        "fused_residual": environment(),
    }


def cached_kernels(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin"))


def phases(device: str) -> tuple[str, ...]:
    return PHASES if device == "cuda" else PHASES[:2]  # no Triton on the CPU: nothing to tune


def measure(device: str, dtype: str, rows: int, width: int, backend: str, timeout: float,
            out: Path | None = None, progress: cli.Progress | None = None) -> list[dict[str, Any]]:
    """The three processes for one width (the warm ones only if the first finished); each record appended to
    ``out`` as soon as its process ends, a ``progress`` step after each."""
    from fused_residual import BACKEND_ENV_VAR

    cache = Path(tempfile.mkdtemp(prefix="fused-residual-triton-cache-"))
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), BACKEND_ENV_VAR: backend}
    command = [sys.executable, "-m", "benchmarks.cold_start", "--child", "--device", device, "--dtype", dtype,
               "--rows", str(rows), "--width", str(width)]
    found = []
    try:
        for phase in phases(device):
            record: dict[str, Any] = {"type": "cold_start", "cache": phase, "device": device, "dtype": dtype,
                                      "rows": rows, "width": width, "backend": backend, "timeout_s": timeout}
            tuned = READS_AUTOTUNE_CACHE[phase]
            record["autotune_cache"] = tuned
            start = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=ROOT, env={**env, "TRITON_CACHE_AUTOTUNING": "1" if tuned else "0"},
                                      capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                record.update(outcome="timeout", message=f"stopped after {timeout:.0f} s")
            else:
                lines = done.stdout.strip().splitlines()
                try:
                    record.update(json.loads(lines[-1]))
                except (IndexError, json.JSONDecodeError):
                    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                    record.update(outcome="failed", message=f"exit status {done.returncode}: " + " | ".join(tail))
            record["process_s"] = time.perf_counter() - start
            record["cache_kernels"] = cached_kernels(cache)
            found.append(record)
            if out is not None:
                records.append(out, record)
            print(describe(record), flush=True)
            if progress is not None:
                progress.step(f"width {width}, {phase}")
            if record["outcome"] != "passed":
                break  # a warm cache is only meaningful after a complete first process
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return found


def describe(record: dict[str, Any]) -> str:
    what = (f"cold start {record['device']} {record['dtype']} {record['rows']}x{record['width']} "
            f"backend {record.get('backend_used') or record['backend']}, {record['cache']} cache:")
    if record.get("first_step_s") is None:
        return f"{what} {record['outcome']} ({record.get('message')})"
    return (f"{what} first forward+backward {record['first_step_s']:.2f} s, second {record['second_step_s']:.4f} s, "
            f"process {record['process_s']:.1f} s, {record['cache_kernels']} kernels in the cache"
            + ("" if record["outcome"] == "passed" else f", {record['outcome']}: {record.get('message')}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.splitlines()[0],
                                     formatter_class=cli.HelpWithDefaults)
    parser.add_argument("--device", choices=sorted(DEFAULTS), default="cuda", help="where to run (default: cuda)")
    parser.add_argument("--dtype", type=cli.short_dtype, metavar=cli.DTYPE_METAVAR, default=None,
                        help="dtype of the block (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--rows", type=cli.positive(int), default=None,
                        help=f"rows of the input (default: {DEFAULTS['cuda']['rows']} on CUDA, "
                             f"{DEFAULTS['cpu']['rows']} on CPU)")
    parser.add_argument("--width", type=cli.positive(int), action="append", default=None,
                        help=f"width of the block; repeat for several widths (default: {DEFAULTS['cuda']['widths'][0]} "
                             f"on CUDA, {DEFAULTS['cpu']['widths'][0]} on CPU)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default=None,
                        help="FUSED_RESIDUAL_BACKEND of the processes (default: triton on CUDA, auto on CPU)")
    parser.add_argument("--timeout", type=cli.positive(float), default=120.0, help="seconds per process (default: 120)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append the records to this JSON-lines file (default: print them only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.device]
    dtype, rows = args.dtype or defaults["dtype"], args.rows or defaults["rows"]
    widths = args.width or defaults["widths"]
    if args.child:
        print(json.dumps(child(args.device, dtype, rows, widths[0]), default=str), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("torch sees no CUDA device (--device cpu checks the plumbing)")
    failed = False
    progress = cli.Progress("cold start", len(widths) * len(phases(args.device)))  # at most: a failure stops a width
    for width in widths:
        found = measure(args.device, dtype, rows, width, args.backend or defaults["backend"], args.timeout, args.out,
                        progress)
        failed |= any(r["outcome"] != "passed" for r in found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
