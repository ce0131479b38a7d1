"""What the suite measures: one ``Case`` per (device, dtype, mode, shape, implementation), in three shape sets.

- ``smoke``: a handful of small shapes, every code path once (CI runs it with timing disabled).
- ``reduced`` (the default when timing): on CUDA a bf16 sweep that fits in a few minutes on an H100, on CPU the
  issue-2 set; ``full``: every CUDA width x row count x dtype of issue 4 (hours with max-autotune).

Implementations (``impl``): ``eager`` (the reference module), ``compile`` (reference under ``torch.compile``),
``max-autotune`` (``mode="max-autotune"``, CUDA only), ``fused`` (FusedResidualBlock/Net, auto backend),
``bare-gemm`` (the block's GEMMs alone via ``torch.mm``, no epilogues: a lower bound, CUDA only) and
``addmm-act`` (``torch._addmm_activation``, forward only, CUDA only).
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
MODES = ("forward", "train")
SHAPE_SETS = ("smoke", "reduced", "full")
REFERENCE = "eager"
FUSED = "fused"


@dataclass(frozen=True)
class Case:
    """One benchmark: ``blocks == 0`` is a single ResidualBlock, ``blocks > 0`` a ResidualNet of that depth."""

    device: str
    dtype: str
    mode: str
    rows: int
    width: int
    impl: str
    blocks: int = 0

    @property
    def kind(self) -> str:
        return "net" if self.blocks else "block"

    @property
    def shape(self) -> str:
        return f"{self.blocks}x{self.rows}x{self.width}" if self.blocks else f"{self.rows}x{self.width}"

    @property
    def id(self) -> str:
        return f"{self.device}-{self.dtype}-{self.mode}-{self.kind}-{self.shape}-{self.impl}"

    @property
    def group(self) -> str:
        """pytest-benchmark group: every implementation of one (device, dtype, mode, shape) side by side."""
        return f"{self.device} {self.dtype} {self.mode} {self.kind} {self.shape}"


# Issue 2's CPU shapes, (rows, width).
CPU_BLOCK_SHAPES = ((16, 10), (4096, 64), (16384, 128), (4096, 512), (1024, 1024), (65536, 32))
# (rows, width, blocks): ResidualNet vs FusedResidualNet.
CPU_NET_SHAPES = ((16384, 64, 8), (4096, 512, 4))

CUDA_WIDTHS = (10, 32, 64, 128, 256, 512, 1024, 4096)
CUDA_ROWS = (1024, 16384, 65536)
CUDA_NET_SHAPES_FULL = ((65536, 64, 8), (16384, 256, 8), (16384, 512, 4), (16384, 1024, 4), (65536, 1024, 8))


def _impls(device: str, mode: str, kind: str, compiled: bool, max_autotune: bool) -> list[str]:
    impls = [REFERENCE]
    if compiled:
        impls.append("compile")
    if max_autotune and device == "cuda":
        impls.append("max-autotune")
    impls.append(FUSED)
    if device == "cuda" and kind == "block":
        impls.append("bare-gemm")
        if mode == "forward":
            impls.append("addmm-act")
    return impls


def _block_cases(device, dtypes, shapes, modes=MODES, compiled=True, max_autotune=False) -> list[Case]:
    return [
        Case(device, dtype, mode, rows, width, impl)
        for dtype in dtypes
        for mode in modes
        for rows, width in shapes
        for impl in _impls(device, mode, "block", compiled, max_autotune)
    ]


def _net_cases(device, dtypes, shapes, modes=MODES, compiled=True, max_autotune=False) -> list[Case]:
    return [
        Case(device, dtype, mode, rows, width, impl, blocks)
        for dtype in dtypes
        for mode in modes
        for rows, width, blocks in shapes
        for impl in _impls(device, mode, "net", compiled, max_autotune)
    ]


def cpu_cases(shape_set: str) -> list[Case]:
    if shape_set == "smoke":
        # torch.compile costs ~20 s cold on 2 cores: compiled variants only for the smallest block.
        return (
            _block_cases("cpu", ["fp32"], [(16, 10)])
            + _block_cases("cpu", ["fp32"], [(256, 64)], compiled=False)
            + _net_cases("cpu", ["fp32"], [(64, 32, 4)], compiled=False)
        )
    # reduced and full are the same on CPU: issue 2's set and two nets.
    return _block_cases("cpu", ["fp32"], CPU_BLOCK_SHAPES) + _net_cases("cpu", ["fp32"], CPU_NET_SHAPES)


def cuda_cases(shape_set: str) -> list[Case]:
    if shape_set == "smoke":
        return (
            _block_cases("cuda", ["bf16", "fp32"], [(1024, 64)], compiled=False)
            + _block_cases("cuda", ["bf16"], [(1024, 256)])
            + _net_cases("cuda", ["bf16"], [(1024, 64, 4)])
        )
    if shape_set == "reduced":
        # A few minutes on an H100: bf16 across the widths at 65536 rows, fp16/fp32 at one width, one
        # max-autotune shape (autotuning costs tens of seconds per shape), one net.
        return (
            _block_cases("cuda", ["bf16"], [(65536, w) for w in (64, 256, 1024, 4096)])
            + _block_cases("cuda", ["fp16", "fp32"], [(65536, 256)], compiled=False)
            + _block_cases("cuda", ["bf16"], [(65536, 1024)], modes=("forward",), max_autotune=True)
            + _net_cases("cuda", ["bf16"], [(16384, 256, 4)])
            # Issue 6's on-chip targets: blocks at widths 64-128 (inference vs max-autotune, and training) and
            # the 8-block width-64 net at 2^20 rows.
            + _block_cases("cuda", ["bf16"], [(65536, 128)])
            + _block_cases("cuda", ["bf16"], [(65536, 64), (65536, 128)], modes=("forward",), max_autotune=True)
            + _net_cases("cuda", ["bf16"], [(1 << 20, 64, 8)], modes=("forward",), max_autotune=True)
        )
    shapes = [(rows, width) for width in CUDA_WIDTHS for rows in CUDA_ROWS]
    return _block_cases("cuda", DTYPES, shapes, max_autotune=True) + _net_cases(
        "cuda", DTYPES, CUDA_NET_SHAPES_FULL, max_autotune=True
    )


def select(shape_set: str, devices: list[str], kind: str) -> list[Case]:
    """The cases of ``kind`` ("block" or "net") in ``shape_set`` for ``devices``, without duplicates."""
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {shape_set!r}; choose one of {', '.join(SHAPE_SETS)}")
    cases: list[Case] = []
    if "cpu" in devices:
        cases += cpu_cases(shape_set)
    if "cuda" in devices:
        cases += cuda_cases(shape_set)
    return [c for c in dict.fromkeys(cases) if c.kind == kind]
