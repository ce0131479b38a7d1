"""Where and from what a run came: date, versions, devices, git commit, and the route the fused modules take.

``python -m benchmarks.env_info [OUT.json]`` prints (and writes) it as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import fused_residual as fr

COMMIT_ENV = "FUSED_RESIDUAL_COMMIT"
ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()


def commit_info() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes) of this checkout. ``FUSED_RESIDUAL_COMMIT`` wins when set: a copy of the tree
    (e.g. on a lent GPU machine) may sit inside some other git repository. Otherwise git, but only when this
    project's root is the top of the work tree git finds; else (None, None)."""
    named = os.environ.get(COMMIT_ENV, "").strip() or None
    top = _git("rev-parse", "--show-toplevel")
    ours = top is not None and Path(top).resolve() == ROOT
    head = _git("rev-parse", "HEAD") if ours else None
    if named is not None and (head is None or not head.startswith(named)):
        return named, None  # git cannot vouch for the tree's state
    if head is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head, None if status is None else bool(status)


def environment() -> dict[str, object]:
    """Date, versions, devices and git commit of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = commit_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "package_version": fr.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "backend_env": os.environ.get(fr.BACKEND_ENV_VAR, "auto"),
    }


def route_name(device: str, dtype: torch.dtype, rows: int, width: int, hidden: int, ffn: bool,
               training: bool) -> str:
    """The route ``auto`` (or the forced backend) takes for such a block call, e.g. "triton:whole_block",
    "torch", "composite"; "unknown" where it cannot be told (metadata only: never fails a benchmark)."""
    from fused_residual import dispatch
    from fused_residual.activations import REFERENCE_FORM, Form

    try:
        probe = torch.empty(1, width, device=device, dtype=dtype).expand(rows, width)
        weight = torch.empty(hidden, width, device=device, dtype=dtype)
        form = Form("gelu", None) if ffn else REFERENCE_FORM
        return dispatch.route(probe, weight, None, form, training).name
    except (TypeError, AttributeError, RuntimeError, ValueError):
        return "unknown"


def describe() -> dict[str, object]:
    info = environment()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_properties"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "family": _family(),  # the kernels' tables and limits there (kernels/_common.py)
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
        }
    return info


def _family() -> str:
    from fused_residual.kernels import _common

    return _common.family(torch.device("cuda", 0)).name


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m benchmarks.env_info [OUT.json]", file=sys.stderr)
        return 2
    text = json.dumps(describe(), indent=2) + "\n"
    if argv:
        Path(argv[0]).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
