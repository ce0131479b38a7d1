"""``python -m fused_residual``: the reference vs fused comparison on the current device.

1. The seed example: the reference ``ResidualNet(5, 10, 2, 2)`` on ``torch.randn(10, 5)``, the fused net with
   the same weights, both predictions and their max difference.
2. Timing of reference vs fused on a larger net (``--batch``, ``--hidden``, ``--blocks``) on ``--device``
   (CUDA if present, else CPU), inference or ``--train`` (forward + backward), as a short table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from . import dispatch
from .activations import SEED_FORM
from .modules import FusedResidualNet
from .reference import ResidualNet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m fused_residual", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device, help=f"torch device (default: {default_device})")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the timed nets")
    parser.add_argument("--batch", type=_positive_int, default=8192, help="rows of the timed input")
    parser.add_argument("--hidden", type=_positive_int, default=256, help="hidden width of the timed net")
    parser.add_argument("--blocks", type=_positive_int, default=4, help="residual blocks in the timed net")
    parser.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
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


def seed_example() -> None:
    torch.manual_seed(0)
    reference = ResidualNet(5, 10, 2, 2)
    x = torch.randn(10, 5)
    fused = FusedResidualNet(5, 10, 2, 2)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected, actual = reference(x), fused(x)
    torch.set_printoptions(precision=5, sci_mode=False)
    print("seed example: ResidualNet(5, 10, 2, 2) on torch.randn(10, 5)")
    print("reference prediction:\n", expected)
    print("fused prediction:\n", actual)
    print(f"max |reference - fused| = {(expected - actual).abs().max().item():.3e}\n")


def _time(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.5) -> float:
    """Median seconds per call (synchronized on CUDA), after warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_seconds and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def timing(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    factory = {"device": args.device, "dtype": args.dtype}
    width = args.hidden
    reference = ResidualNet(width, width, width, args.blocks).to(**factory)
    fused = FusedResidualNet(width, width, width, args.blocks, **factory)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(args.batch, width, **factory)
    backend = dispatch.route(x, fused.blocks[0].linear1.weight, None, SEED_FORM, args.train).name

    if args.train:
        x.requires_grad_(True)
        dout = torch.randn(args.batch, width, **factory)

        def step(model: torch.nn.Module) -> Callable[[], object]:
            def run() -> None:
                model.zero_grad(set_to_none=True)
                x.grad = None
                model(x).backward(dout)

            return run

        mode = "forward+backward"
    else:

        def step(model: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return model(x)

            return run

        mode = "inference"

    t_ref = _time(step(reference), args.device)
    t_fused = _time(step(fused), args.device)
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(f"timing: ResidualNet({width}, {width}, {width}, {args.blocks}), batch {args.batch}, {dtype_name}, "
          f"{args.device}, {mode}, fused backend: {backend}")
    print(f"{'implementation':<16}{'median ms':>12}{'speed-up':>10}")
    print(f"{'reference':<16}{t_ref * 1e3:>12.3f}{1.0:>9.2f}x")
    print(f"{'fused':<16}{t_fused * 1e3:>12.3f}{t_ref / t_fused:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed_example()
    timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
