"""What the suite measures: one ``Case`` per (device, dtype, mode, shape, implementation), in four shape sets.

- ``smoke``: a handful of small shapes, every code path once (CI runs it with timing disabled).
- ``quick``: on CPU the six benchmark block shapes in every mode, one FFN and one net, eager vs fused only (with
  ``--quick``'s shorter timing it takes under 3 minutes on 2 cores); on CUDA the same as ``reduced``.
- ``reduced`` (the default when timing): on CUDA a bf16 sweep that fits in a few minutes on an H100, on CPU the
  six benchmark block shapes, two FFNs and two nets with torch.compile too; ``full``: every CUDA width x row count
  x dtype (hours with max-autotune).

Implementations (``impl``): ``eager`` (the reference module), ``compile`` (reference under ``torch.compile``),
``max-autotune`` (``mode="max-autotune"``, CUDA only), ``fused`` (FusedResidualBlock/Net, auto backend),
``reduce-overhead`` and ``fused-reduce-overhead`` (the reference and the fused module under
``torch.compile(mode="reduce-overhead")``: CUDA graphs on both sides, CUDA only), ``bare-gemm`` (the block's GEMMs
alone via ``torch.mm``, no epilogues: a lower bound, CUDA only) and ``addmm-act`` (``torch._addmm_activation``,
forward only, CUDA only).

``priority`` orders a run so that a run stopped at its time limit has measured what matters most: the
measurement file's block shapes (eager and fused side by side, forward and training) first, compiled variants
and extra dtypes last.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")
MODES = ("forward", "train", "train-sum")  # train-sum: loss = y.sum() (CPU set only)
# What each mode times, as plots and reports caption it.
MODE_CAPTIONS = {
    "forward": "forward: inference under torch.no_grad()",
    "train": "train: a training step, forward + y.backward(dout) with x and every parameter requiring grad",
    "train-sum": "train-sum: a training step with the loss y.sum(), y.sum().backward() (the gradient handed to "
                 "the block is expanded ones)",
}
STEP_MODES = ("forward", "train")
SHAPE_SETS = ("smoke", "quick", "reduced", "full")
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
REFERENCE = "eager"
FUSED = "fused"
RO_REFERENCE = "reduce-overhead"
RO_FUSED = "fused-reduce-overhead"
IMPLS = (REFERENCE, "compile", "max-autotune", RO_REFERENCE, FUSED, RO_FUSED, "bare-gemm", "addmm-act")
CUDA_ONLY_IMPLS = ("max-autotune", RO_REFERENCE, RO_FUSED, "bare-gemm", "addmm-act")


@dataclass(frozen=True)
class Case:
    """One benchmark: ``blocks == 0`` is a single ResidualBlock, ``blocks > 0`` a ResidualNet of that depth,
    ``ffn`` a transformer FFN block (``FFN_HIDDEN`` x width hidden, GELU, no final activation)."""

    device: str
    dtype: str
    mode: str
    rows: int
    width: int
    impl: str
    blocks: int = 0
    ffn: bool = False  # the transformer FFN form: x + linear2(gelu(linear1(x))), hidden 4 x width

    @property
    def kind(self) -> str:
        return "ffn" if self.ffn else "net" if self.blocks else "block"

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


# The six benchmark block shapes on CPU, (rows, width): tiny, tall-narrow, and GEMM-bound wide ones.
CPU_BLOCK_SHAPES = ((16, 10), (4096, 64), (16384, 128), (4096, 512), (1024, 1024), (65536, 32))
# (rows, width, blocks): ResidualNet vs FusedResidualNet.
CPU_NET_SHAPES = ((16384, 64, 8), (4096, 512, 4))
# (rows, width) of the FFN form, hidden FFN_HIDDEN x width.
FFN_HIDDEN = 4
CPU_FFN_SHAPES = ((4096, 64), (1024, 256))
CUDA_FFN_SHAPES = ((16384, 512), (16384, 1024), (8192, 2048))

CUDA_WIDTHS = (10, 32, 64, 128, 256, 512, 1024, 4096)
CUDA_ROWS = (1024, 16384, 65536)
CUDA_NET_SHAPES_FULL = ((65536, 64, 8), (16384, 256, 8), (16384, 512, 4), (16384, 1024, 4), (65536, 1024, 8))
# The block shapes of the first GPU measurement (results/h200-2026-11-26-44834e3/), (rows, width, dtype): the GPU
# targets are judged on them, and a run measures them first.
CUDA_MEASURED_SHAPES = (
    (65536, 32, "bf16"), (65536, 64, "bf16"), (65536, 128, "bf16"), (65536, 256, "bf16"),
    (32768, 512, "bf16"), (16384, 1024, "bf16"), (8192, 4096, "bf16"), (65536, 128, "fp16"),
)
# The reduce-overhead target (both sides under CUDA graphs) holds at widths up to this.
RO_TARGET_MAX_WIDTH = 256
MAIN_DTYPE = {"cpu": "fp32", "cuda": "bf16"}


def _impls(device: str, mode: str, kind: str, compiled: bool, max_autotune: bool, baselines: bool = True,
           reduce_overhead: bool = False) -> list[str]:
    impls = [REFERENCE]
    if compiled:
        impls.append("compile")
    if max_autotune and device == "cuda":
        impls.append("max-autotune")
    impls.append(FUSED)
    if reduce_overhead and device == "cuda":
        impls += [RO_REFERENCE, RO_FUSED]
    if baselines and device == "cuda" and kind == "block":
        impls.append("bare-gemm")
        if mode == "forward":
            impls.append("addmm-act")
    return impls


def _block_cases(device, dtypes, shapes, modes=STEP_MODES, compiled=True, max_autotune=False, **impls) -> list[Case]:
    return [
        Case(device, dtype, mode, rows, width, impl)
        for dtype in dtypes
        for mode in modes
        for rows, width in shapes
        for impl in _impls(device, mode, "block", compiled, max_autotune, **impls)
    ]


def _net_cases(device, dtypes, shapes, modes=STEP_MODES, compiled=True, max_autotune=False, **impls) -> list[Case]:
    return [
        Case(device, dtype, mode, rows, width, impl, blocks)
        for dtype in dtypes
        for mode in modes
        for rows, width, blocks in shapes
        for impl in _impls(device, mode, "net", compiled, max_autotune, **impls)
    ]


def _ffn_cases(device, dtypes, shapes, modes=STEP_MODES, compiled=True, **impls) -> list[Case]:
    return [
        Case(device, dtype, mode, rows, width, impl, ffn=True)
        for dtype in dtypes
        for mode in modes
        for rows, width in shapes
        for impl in _impls(device, mode, "ffn", compiled, False, **impls)
    ]


def cpu_cases(shape_set: str) -> list[Case]:
    if shape_set == "smoke":
        # torch.compile costs ~20 s cold on 2 cores: compiled variants only for the smallest block.
        return (
            _block_cases("cpu", ["fp32"], [(16, 10)])
            + _block_cases("cpu", ["fp32"], [(256, 64)], compiled=False)
            + _net_cases("cpu", ["fp32"], [(64, 32, 4)], compiled=False)
            + _ffn_cases("cpu", ["fp32"], [(64, 32)], compiled=False)
        )
    if shape_set == "quick":  # eager vs fused only: torch.compile costs ~20 s per cold compile on 2 cores
        return (_block_cases("cpu", ["fp32"], CPU_BLOCK_SHAPES, modes=MODES, compiled=False)
                + _ffn_cases("cpu", ["fp32"], CPU_FFN_SHAPES[:1], compiled=False)
                + _net_cases("cpu", ["fp32"], CPU_NET_SHAPES[:1], compiled=False))
    # reduced and full are the same on CPU: the six block shapes, two nets and two FFNs.
    return (_block_cases("cpu", ["fp32"], CPU_BLOCK_SHAPES, modes=MODES)
            + _net_cases("cpu", ["fp32"], CPU_NET_SHAPES) + _ffn_cases("cpu", ["fp32"], CPU_FFN_SHAPES))


def cuda_cases(shape_set: str) -> list[Case]:
    if shape_set == "smoke":
        return (
            _block_cases("cuda", ["bf16", "fp32"], [(1024, 64)], compiled=False)
            + _block_cases("cuda", ["bf16"], [(1024, 256)], reduce_overhead=True)
            + _net_cases("cuda", ["bf16"], [(1024, 64, 4)])
            + _ffn_cases("cuda", ["bf16"], [(1024, 256)], compiled=False)
        )
    if shape_set in ("quick", "reduced"):
        # Run in `priority` order: a budgeted run (gpu_check.sh) measures the first GPU run's shapes first and
        # stops wherever its time runs out, keeping every finished case (--bench-jsonl).
        measured = {dtype: [(r, w) for r, w, d in CUDA_MEASURED_SHAPES if d == dtype] for dtype in ("bf16", "fp16")}
        return (
            _block_cases("cuda", ["bf16"], measured["bf16"], compiled=False)
            + _block_cases("cuda", ["fp16"], measured["fp16"], compiled=False)
            # Both sides under CUDA graphs at widths <= 256 (whole-block and two-GEMM paths).
            + _block_cases("cuda", ["bf16"], [(65536, 64), (65536, 256)], compiled=False, baselines=False,
                           reduce_overhead=True)
            + _net_cases("cuda", ["bf16"], [(16384, 256, 4)])
            + _block_cases("cuda", ["fp32"], [(65536, 256)], compiled=False)
            # The on-chip widths: blocks at widths 64-128 in inference vs max-autotune (autotuning costs tens of
            # seconds per shape), and the 8-block width-64 net at 2^20 rows.
            + _block_cases("cuda", ["bf16"], [(65536, 64), (65536, 128), (16384, 1024)], modes=("forward",),
                           max_autotune=True)
            + _net_cases("cuda", ["bf16"], [(1 << 20, 64, 8)], modes=("forward",), max_autotune=True)
            + _ffn_cases("cuda", ["bf16"], CUDA_FFN_SHAPES)
        )
    shapes = [(rows, width) for width in CUDA_WIDTHS for rows in CUDA_ROWS]
    return (_block_cases("cuda", DTYPES, shapes, max_autotune=True, reduce_overhead=True)
            + _net_cases("cuda", DTYPES, CUDA_NET_SHAPES_FULL, max_autotune=True, reduce_overhead=True)
            + _ffn_cases("cuda", DTYPES, CUDA_FFN_SHAPES))


def is_measured_shape(case: Case) -> bool:
    """A shape whose result matters most: the first GPU run's blocks on CUDA, the six block shapes on CPU."""
    if case.kind != "block":
        return False
    if case.device == "cuda":
        return (case.rows, case.width, case.dtype) in CUDA_MEASURED_SHAPES
    return case.dtype == MAIN_DTYPE["cpu"] and (case.rows, case.width) in CPU_BLOCK_SHAPES


# `priority`'s implementation classes: the fused-vs-eager pair, the cheap baselines, the CUDA-graph pair (a compile
# each), the default compile, max-autotune (autotunes for tens of seconds).
_IMPL_CLASS = {REFERENCE: 0, FUSED: 0, "bare-gemm": 1, "addmm-act": 1, RO_REFERENCE: 2, RO_FUSED: 2, "compile": 3,
               "max-autotune": 4}


def priority(case: Case) -> tuple:
    """Sort key of a run, smaller first. Tiers: 0 the measured shapes' eager/fused pairs; 1 their baselines
    (bare-gemm, addmm-act); 2 other blocks and 3 nets of the device's main dtype; 4 the reduce-overhead pairs,
    5 compile, 6 max-autotune (main dtype); 7 extra dtypes' pairs and baselines, 8-10 their compiled variants.
    Within a tier shape by shape, forward before training, eager just before fused."""
    impl = _IMPL_CLASS.get(case.impl, 5)
    main = case.dtype == MAIN_DTYPE.get(case.device)
    if impl <= 1:
        tier = impl if is_measured_shape(case) else (2 if case.kind == "block" else 3) if main else 7
    else:
        tier = 2 + impl if main else 6 + impl
    return (tier, case.device, case.blocks, case.width, case.rows, case.dtype, MODES.index(case.mode),
            IMPLS.index(case.impl) if case.impl in IMPLS else len(IMPLS))


def select(shape_set: str, devices: list[str], kind: str) -> list[Case]:
    """The cases of ``kind`` ("block" or "net") in ``shape_set`` for ``devices``, without duplicates, in
    ``priority`` order."""
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {shape_set!r}; choose one of {', '.join(SHAPE_SETS)}")
    cases: list[Case] = []
    if "cpu" in devices:
        cases += cpu_cases(shape_set)
    if "cuda" in devices:
        cases += cuda_cases(shape_set)
    return sorted((c for c in dict.fromkeys(cases) if c.kind == kind), key=priority)


def work(case: Case) -> tuple[int, int | None]:
    """(FLOPs, minimum bytes through memory) of one step; bytes only for a block.

    Block forward: 2 GEMMs, ``4 M H^2`` FLOPs; bytes read x and the weights, write out (the whole-block
    kernel's 2 passes). Training: 3x the FLOPs; bytes of the saved-h design: forward writes h and out (3
    passes), backward reads dout, out, h, x and writes dx (5 passes), weights read twice, weight grads written.
    """
    m, h, e = case.rows, case.width, ELEMENT_BYTES[case.dtype]
    gemms = 2 * case.blocks + 2 if case.blocks else 2 * FFN_HIDDEN if case.ffn else 2
    flops = 2 * m * h * h * gemms * (3 if case.mode != "forward" else 1)
    if case.blocks or case.ffn:
        return flops, None
    if case.mode == "forward":
        return flops, e * (2 * m * h + 2 * h * h + 2 * h)
    return flops, e * (8 * m * h + 6 * h * h + 4 * h)
