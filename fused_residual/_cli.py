"""What the package's commands (``python -m fused_residual`` and its ``info``) share on their command lines: value
parsers that make a bad value a usage error (exit 2, no traceback), torch's dtype names, help showing defaults."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a positive ``kind`` (int or float)."""

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


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (a flag, an option decided later) or the
    help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
