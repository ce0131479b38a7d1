"""``python -m fused_residual.tune``: measure which implementation of the block is fastest here; write the table.

For each (dtype, width, row bucket, mode) in order of importance, until the time budget is spent, it times the
reference block (``fr.ResidualBlock``) and every candidate of ``dispatch.CANDIDATES`` that can run the call, with
the same weights and inputs, checks each candidate's output (and, in training, its input gradient) against the
reference's, and records the winner: the lowest median wall time per call among the candidates that agree.
"Wall time per call" is what a user feels: on CUDA the CUDA-event time of the whole Python call
(``triton.testing.do_bench``, back to back, so host time shows where the GPU waits for the host); on the CPU the
median of many timed batches, the candidates taking turns (A B C A B C ...) so that other load hits all alike.

The table (see ``dispatch.py`` for the format and where tables are read) is rewritten after each entry, so a
run stopped at any point keeps what it measured. By default it goes to the user's tuned tables
(``~/.cache/fused_residual/dispatch-<device>.json``), which ``auto`` then uses; ship it by copying it into
``fused_residual/dispatch_tables/``.

    python -m fused_residual.tune                      # this machine's GPU (else CPU), <= 5 minutes
    python -m fused_residual.tune --device cpu --budget-s 120 --out table.json
    python -m fused_residual.tune --dtypes bfloat16 --widths 64,128 --rows 65536 --modes forward

Each entry prints ``[n of N, ETA ...]``: N is the entries planned, the ETA the time they take at the pace so far,
capped by the budget. A bad option is a usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import backends, dispatch
from .activations import REFERENCE_FORM
from .modules import FusedResidualBlock
from .reference import ResidualBlock

# The main command's spellings (and the tables'); the short forms are refused with a hint, not guessed.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CUDA_DTYPES = ("bfloat16", "float16", "float32")
CPU_DTYPES = ("float32",)
CUDA_WIDTHS = (64, 128, 256, 32, 512, 1024, 4096, 16, 2048)
CUDA_ROWS = (65536, 16384, 1024)
CPU_WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
CPU_ROWS = (16, 256, 4096, 65536)
# max |candidate - reference| / max |reference| allowed, by dtype (fp32 admits TF32 where PyTorch allows it).
PARITY = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-3, torch.float64: 1e-9}


def shapes(device_type: str, dtypes: list[str], widths: list[int] | None, rows: list[int] | None):
    """(dtype, width, rows) in the order they are measured: the first dtype over every width at the most rows
    first, since large batches are where the choice matters most."""
    widths = widths or list(CUDA_WIDTHS if device_type == "cuda" else CPU_WIDTHS)
    rows = rows or list(CUDA_ROWS if device_type == "cuda" else CPU_ROWS)
    for dtype in dtypes:
        for n in rows:
            for width in widths:
                if device_type != "cuda" and n * width > 1 << 23:  # minutes per entry on a small CPU
                    continue
                yield dtype, width, n


def candidates(device: torch.device, dtype: torch.dtype, width: int, training: bool) -> list[str]:
    """The candidates that can run a reference-form block of this width and dtype on ``device``."""
    found = ["torch", "composite"]
    if device.type == "cuda" and backends.missing_requirement("triton") is None:
        backend = backends.get("triton")
        if backend.unavailable(device, dtype, REFERENCE_FORM) is None:
            probe = torch.empty(1, width, device=device, dtype=dtype)
            weight = torch.empty(width, width, device=device, dtype=dtype)
            if backend.whole_block_forward_fits(probe, weight, None):
                found.insert(0, "triton:whole_block")
            found.insert(0, "triton:two_gemm")
    return found


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _step(block: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor, training: bool) -> Callable[[], torch.Tensor]:
    params = list(block.parameters())

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return block(x)

    def train() -> torch.Tensor:
        for p in params:
            p.grad = None
        x.grad = None
        out = block(x)
        out.backward(dout)
        return out

    return train if training else forward


Run = tuple[str | None, Callable[[], object]]  # (FUSED_RESIDUAL_BACKEND to run under, or None: leave it), step


def _use(choice: str | None) -> None:
    if choice is not None:
        os.environ[dispatch.ENV_VAR] = choice


def _timer(device: torch.device) -> Callable[[list[Run], float], list[float]]:
    """``time(runs, seconds) -> [us per call]``: the backend choice is set once per timed batch, not per call."""
    if device.type == "cuda":
        import triton.testing

        def cuda(runs, seconds):
            rep = max(20.0, 1000 * seconds / len(runs))
            times = []
            for choice, step in runs:
                _use(choice)
                times.append(triton.testing.do_bench(step, warmup=10, rep=rep, return_mode="median") * 1e3)
            return times

        return cuda

    def cpu(runs, seconds):
        t0 = time.perf_counter()
        for choice, step in runs:  # warm-up, and a calibration of calls per timed batch
            _use(choice)
            step()
        per_call = (time.perf_counter() - t0) / len(runs)
        batch = max(1, int(0.005 / max(per_call, 1e-9)))
        samples: list[list[float]] = [[] for _ in runs]
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(samples[0]) < 5:
            for (choice, step), sample in zip(runs, samples, strict=True):
                _use(choice)
                step()  # the route's first call after a switch re-reads the variable: keep it out of the batch
                t0 = time.perf_counter()
                for _ in range(batch):
                    step()
                sample.append((time.perf_counter() - t0) / batch * 1e6)
        return [statistics.median(x) for x in samples]

    return cpu


def measure(device: torch.device, dtype: torch.dtype, width: int, rows: int, training: bool,
            seconds: float) -> dict:
    """One table entry: every candidate's time (us per call), the reference's, and the winner."""
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    reference = ResidualBlock(width, width).to(**factory)
    fused = FusedResidualBlock(width, width, **factory)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(rows, width, **factory).requires_grad_(training)
    dout = torch.randn(rows, width, **factory)
    names = candidates(device, dtype, width, training)
    env = os.environ.get(dispatch.ENV_VAR)
    runs: list[Run] = [(None, _step(reference, x, dout, training))]
    expected = runs[0][1]()
    expected_grad = x.grad.clone() if training else None
    agree = {}
    try:
        for name in names:
            os.environ[dispatch.ENV_VAR] = name
            step = _step(fused, x, dout, training)
            err = _relative_error(step(), expected)
            if training:
                err = max(err, _relative_error(x.grad, expected_grad))
            agree[name] = err <= PARITY[dtype]
            runs.append((name, step))
        times = _timer(device)(runs, seconds)
    finally:
        if env is None:
            os.environ.pop(dispatch.ENV_VAR, None)
        else:
            os.environ[dispatch.ENV_VAR] = env
    us = dict(zip(["reference", *names], (round(t, 2) for t in times), strict=True))
    eligible = [n for n in names if agree[n]]
    winner = min(eligible, key=lambda n: us[n]) if eligible else "composite"
    return {"dtype": dispatch.DTYPE_NAMES[dtype], "width": width, "hidden": width, "rows": rows,
            "mode": "train" if training else "forward", "winner": winner, "us": us,
            "reference_over_winner": round(us["reference"] / us[winner], 3),
            "disagreed": [n for n in names if not agree[n]]}


def _commit() -> str | None:
    if os.environ.get("FUSED_RESIDUAL_COMMIT"):
        return os.environ["FUSED_RESIDUAL_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def header(device: torch.device) -> dict:
    name, capability = dispatch.device_identity(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"format": dispatch.FORMAT, "device": name, "family": dispatch.device_family(device),
            "capability": list(capability),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": _commit(),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "timing": ("median wall time per call in us: do_bench of the whole Python call on CUDA, "
                       "candidates taking turns on the CPU"), "entries": []}


def default_out(device: torch.device) -> Path:
    name = dispatch.device_identity(device)[0]
    return dispatch.user_cache_dir() / f"dispatch-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"


def write_table(path: Path, table: dict) -> None:
    """Write ``table`` to ``path`` atomically: a temporary file beside it, then a rename. A reader (or a run
    stopped at any point) sees the previous whole table or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(table, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- the command line -------------------------------------------------------------------------------------

_SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


def _listed(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of ``item``s, at least one, no repeats."""

    def parse(text: str) -> list:
        words = [w.strip() for w in text.split(",")]
        if not all(words):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty item in a comma-separated list of {what}")
        values = [item(w) for w in words]
        repeated = [str(v) for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given twice")
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number of seconds")
    return value


def _dtype(text: str) -> str:
    if text in DTYPES:
        return text
    hint = f" (did you mean {_SHORT_DTYPES[text]}?)" if text in _SHORT_DTYPES else ""
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DTYPES)}{hint}")


def _mode(text: str) -> str:
    if text not in dispatch.MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(dispatch.MODES)}")
    return text


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: tune measures on cpu or cuda[:index]")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA device")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m fused_residual.tune",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--device", type=_device, default=default_device,
                        help="where to measure: cpu, cuda or cuda:N (default: cuda where there is one, else cpu; "
                             "here %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="table path (default: the user's tuned tables, which auto reads: "
                             f"{dispatch.user_cache_dir()}/dispatch-<device>.json)")
    parser.add_argument("--budget-s", type=_positive_float, default=300.0, metavar="SECONDS",
                        help="start no entry after this many seconds (default: %(default)s)")
    parser.add_argument("--seconds", type=_positive_float, default=None,
                        help="timing seconds per entry (default: 0.3 on CUDA, 1.0 on the CPU)")
    parser.add_argument("--dtypes", type=_listed(_dtype, "dtypes"), default=None,
                        help=f"comma-separated, of {', '.join(DTYPES)} (default: {','.join(CUDA_DTYPES)} on CUDA, "
                             f"{','.join(CPU_DTYPES)} on the CPU)")
    parser.add_argument("--widths", type=_listed(_positive_int, "widths"), default=None,
                        help="comma-separated block widths (default: CUDA "
                             f"{','.join(map(str, CUDA_WIDTHS))}; CPU {','.join(map(str, CPU_WIDTHS))})")
    parser.add_argument("--rows", type=_listed(_positive_int, "row counts"), default=None,
                        help=f"comma-separated row counts (default: CUDA {','.join(map(str, CUDA_ROWS))}; CPU "
                             f"{','.join(map(str, CPU_ROWS))}; on the CPU rows x width above 2^23 is skipped)")
    parser.add_argument("--modes", type=_listed(_mode, "modes"), default=list(dispatch.MODES),
                        help=f"comma-separated, of {', '.join(dispatch.MODES)}: inference (no autograd), or a "
                             f"forward and backward step (default: {','.join(dispatch.MODES)})")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = list(CUDA_DTYPES if args.device.type == "cuda" else CPU_DTYPES)
    if args.seconds is None:
        args.seconds = 0.3 if args.device.type == "cuda" else 1.0
    args.out = args.out or default_out(args.device)
    return args


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    table = header(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plan = [(dtype_name, width, rows, mode)
            for dtype_name, width, rows in shapes(args.device.type, args.dtypes, args.widths, args.rows)
            for mode in args.modes]
    print(f"tune: {table['device']} | torch {table['torch']} | triton {table['triton']} -> {args.out}", flush=True)
    print(f"tune: {len(plan)} entries planned, a budget of {_duration(args.budget_s)}", flush=True)
    for done, (dtype_name, width, rows, mode) in enumerate(plan):
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s:
            print(f"tune: budget of {_duration(args.budget_s)} spent; {len(table['entries'])} of {len(plan)} "
                  "entries measured", flush=True)
            return 0
        try:
            entry = measure(args.device, DTYPES[dtype_name], width, rows, mode == "train", args.seconds)
        except torch.OutOfMemoryError:
            print(f"  {dtype_name} {rows}x{width} {mode}: out of memory, skipped", flush=True)
            continue
        table["entries"].append(entry)
        write_table(args.out, table)  # after each entry: a stopped run keeps what it measured
        elapsed = time.monotonic() - started
        remaining = min(elapsed / (done + 1) * (len(plan) - done - 1), max(0.0, args.budget_s - elapsed))
        times = "  ".join(f"{k} {v:.1f}" for k, v in entry["us"].items())
        print(f"  [{done + 1} of {len(plan)}, ETA {_duration(remaining)}] {dtype_name} {rows:>6}x{width:<5} "
              f"{mode:<7} winner {entry['winner']:<19} {entry['reference_over_winner']:.2f}x vs reference | us: "
              f"{times}", flush=True)
    print(f"tune: done, {len(table['entries'])} entries in {_duration(time.monotonic() - started)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
