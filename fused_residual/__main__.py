"""``python -m fused_residual``: the reference block against the fused one on this machine.

1. A small example: the reference ``ResidualNet(5, 10, 2, 2)`` on ``torch.randn(10, 5)``, the fused net with the
   same weights, both predictions and their largest difference.
2. Which route the fused blocks take at the timed shape (``FUSED_RESIDUAL_BACKEND``, default ``auto``), and why
   (``python -m fused_residual info`` tells it for other shapes and models).
3. Timing of the reference and the fused net (``--batch`` rows, ``--hidden`` width, ``--blocks`` blocks) on
   ``--device`` (CUDA if present, else CPU), inference or ``--train`` (forward + backward): the two are timed in
   alternation, the side that goes first switching every round (A B, B A, ...), so that load from other processes
   hits both alike. Reported: each side's median and interquartile range (IQR), and the median and IQR of the
   per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import dispatch
from ._cli import DTYPES, HelpWithDefaults, positive
from .activations import REFERENCE_FORM
from .modules import FusedResidualNet
from .reference import ResidualNet

MIN_ROUNDS, MAX_ROUNDS = 5, 1000
PROGRESS_AFTER_S = 2.0  # a timing expected to take longer prints an "n of N, ETA" line now and then


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m fused_residual", formatter_class=HelpWithDefaults,
                                     description="The reference residual block against the fused one on this "
                                                 "machine: an example, the route taken, and the two timed in "
                                                 "alternation.",
                                     epilog="python -m fused_residual info [--help]: what runs here and why "
                                            "(versions, device, dispatch tables, the route of a block call or of "
                                            "each block of a model).")
    parser.add_argument("--device", default=default_device, help="torch device of the timed nets")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the timed nets")
    parser.add_argument("--batch", type=positive(int), default=8192, help="rows of the timed input")
    parser.add_argument("--hidden", type=positive(int), default=256, help="width of the timed net")
    parser.add_argument("--blocks", type=positive(int), default=4, help="residual blocks in the timed net")
    parser.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    parser.add_argument("--seconds", type=positive(float), default=3.0,
                        help=f"timing budget for both sides together (at least {MIN_ROUNDS} rounds)")
    parser.add_argument("--rounds", type=positive(int), default=None,
                        help="exact number of alternated rounds (default: as many as --seconds allows)")
    args = parser.parse_args(argv)
    device_text = args.device
    try:
        args.device = torch.device(device_text)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError for CUDA on a CPU build
        parser.error(f"--device {device_text!r} is not usable here: {err}")
    args.dtype = DTYPES[args.dtype]
    if args.device.type == "cpu" and args.dtype is torch.float16:
        parser.error("--dtype float16 is slow and poorly supported on the CPU; use float32 or bfloat16")
    return args


def example() -> None:
    torch.manual_seed(0)
    reference = ResidualNet(5, 10, 2, 2)
    x = torch.randn(10, 5)
    fused = FusedResidualNet(5, 10, 2, 2)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    torch.set_printoptions(precision=5, sci_mode=False)
    print("example: ResidualNet(5, 10, 2, 2) on torch.randn(10, 5), the fused net with the same weights")
    print("reference prediction:\n", expected)
    print("fused prediction:\n", actual)
    print(f"max |reference - fused| = {(expected - actual).abs().max().item():.3e}\n")


def block_route(x: torch.Tensor, weight: torch.Tensor, training: bool) -> tuple[str, str]:
    """The route a residual block call on ``x`` takes and why: the one place this command asks the package."""
    chosen, why = dispatch.decide(dispatch.requested(), x, weight, None, REFERENCE_FORM, training)
    return chosen.name, why


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def alternate(first: Callable[[], object], second: Callable[[], object], rounds: int,
              clock: Callable[[], float] = time.perf_counter,
              progress: Callable[[int, int, float], None] | None = None) -> tuple[list[float], list[float]]:
    """Times ``first`` and ``second`` once per round each, the side that goes first switching every round
    (A B, B A, A B, ...). Returns the two lists of seconds per call, in round order."""
    times: tuple[list[float], list[float]] = ([], [])
    sides = (first, second)
    start = clock()
    for i in range(rounds):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = clock()
            sides[side]()
            times[side].append(clock() - t0)
        if progress is not None:
            progress(i + 1, rounds, clock() - start)
    return times


def _progress_printer(expected_s: float) -> Callable[[int, int, float], None] | None:
    """Prints "round n of N, ETA" to stderr about once a second, for a timing expected to run long."""
    if expected_s < PROGRESS_AFTER_S:
        return None
    last = [0.0]

    def show(done: int, total: int, elapsed: float) -> None:
        if elapsed - last[0] >= 1.0 or done == total:
            last[0] = elapsed
            eta = elapsed / done * (total - done)
            print(f"timing: round {done} of {total}, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    return show


def timing(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    factory = {"device": args.device, "dtype": args.dtype}
    width = args.hidden
    reference = ResidualNet(width, width, width, args.blocks).to(**factory)
    fused = FusedResidualNet(width, width, width, args.blocks, **factory)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(args.batch, width, **factory)
    route, why = block_route(x, fused.blocks[0].linear1.weight, args.train)
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    if args.train:
        x.requires_grad_(True)
        dout = torch.randn(args.batch, width, **factory)
        mode = "forward+backward"
    else:
        mode = "inference"

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            if args.train:
                model.zero_grad(set_to_none=True)
                x.grad = None
                model(x).backward(dout)
            else:
                with torch.no_grad():
                    model(x)
            sync()

        return run

    run_reference, run_fused = step(reference), step(fused)
    warm = alternate(run_reference, run_fused, 3)  # first calls: allocations, compiles, autotuning
    per_round = statistics.median(warm[0]) + statistics.median(warm[1])
    rounds = args.rounds or int(min(MAX_ROUNDS, max(MIN_ROUNDS, args.seconds / max(per_round, 1e-9))))
    ref_times, fused_times = alternate(run_reference, run_fused, rounds,
                                       progress=_progress_printer(rounds * per_round))
    ratios = [r / f for r, f in zip(ref_times, fused_times, strict=True)]
    env = os.environ.get(dispatch.ENV_VAR, "auto")
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(f"route: {route} (each residual block's call at this shape; {dispatch.ENV_VAR}={env}): {why}")
    print(f"timing: ResidualNet({width}, {width}, {width}, {args.blocks}), batch {args.batch}, {dtype_name}, "
          f"{args.device}, {mode}; {rounds} rounds, reference and fused alternated (A B, B A, ...)")
    print(f"{'implementation':<16}{'median ms':>12}{'IQR ms':>22}")
    for name, times in (("reference", ref_times), ("fused", fused_times)):
        q1, median, q3 = quartiles(times)
        print(f"{name:<16}{median * 1e3:>12.3f}{f'{q1 * 1e3:.3f} - {q3 * 1e3:.3f}':>22}")
    q1, median, q3 = quartiles(ratios)
    print(f"speed-up of fused (reference time / fused time, per round): median {median:.2f}x, "
          f"IQR {q1:.2f}x - {q3:.2f}x")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"]:
        from . import info  # only for this command: it imports nothing the comparison needs

        return info.main(argv[1:])
    args = parse_args(argv)
    example()
    timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
