"""What the benchmark commands share on their command lines: value parsers that turn a bad value into a usage
error (exit 2, no traceback), one dtype spelling (torch's, as ``python -m fused_residual`` and ``tune`` take it),
help that shows each default, and an "n of N, ETA" progress line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

# The command lines spell dtypes as torch does; records and case ids keep the suite's short names.
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPE_METAVAR = "{" + ",".join(sorted(DTYPE_NAMES)) + "}"


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a positive ``kind`` (int or float), else a usage error."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers ("64,256")."""
    parse = positive(int)
    return [int(parse(part.strip())) for part in text.split(",")]


def choices_of(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``allowed``, in the order given."""

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",")]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or text!r} not among {', '.join(allowed)}")
        return values

    parse.__name__ = "list"
    return parse


def short_dtype(text: str) -> str:
    """An argparse type: a dtype as torch spells it (``bfloat16``), returned as the suite's short name (``bf16``).
    The short name is accepted too (records and child processes use it), but help shows torch's spelling only."""
    if text in DTYPE_NAMES:
        return DTYPE_NAMES[text]
    if text in DTYPE_NAMES.values():
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(sorted(DTYPE_NAMES))})")


short_dtype.__name__ = "dtype"


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (a flag, an option whose default is
    decided later) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text or text == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Progress:
    """Prints "<what>: n of N done, <elapsed> s, ETA <seconds> s" to stderr after each of N steps (the ETA from
    the mean time per step so far)."""

    def __init__(self, what: str, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.what, self.total, self.clock = what, total, clock
        self.done, self.start = 0, clock()

    def step(self, note: str = "") -> str:
        self.done += 1
        elapsed = self.clock() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        line = f"{self.what}: {self.done} of {self.total} done, {elapsed:.0f} s, ETA {eta:.0f} s"
        line += f" ({note})" if note else ""
        print(line, file=sys.stderr, flush=True)
        return line
