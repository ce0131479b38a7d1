"""``python -m benchmarks.env_info [OUT.json]``: where a run happens (device, versions, date, git commit) as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .harness import environment


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
