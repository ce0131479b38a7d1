"""The whole-block kernels' configurations and width limits: which padded widths, dtypes and devices the forward
and the backward take, the forward's autotune candidates and their prune hook, the backward's fixed choice.

Plain Python (no triton): the backend asks whether the whole block runs a shape without importing triton. The
kernels are ``whole_block_forward.py`` and ``whole_block_backward.py``; ``whole_block.py`` launches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from . import _common
from ._common import next_power_of_2

if TYPE_CHECKING:
    import triton


class ForwardConfig(NamedTuple):
    """One forward candidate: ``programs_per_sm`` 0 is a program per row tile, else a persistent grid that loads
    the weights once per program; ``hidden_chunk`` 0 keeps both weights on chip, else they stream from L2 that
    many hidden units at a time, software-pipelined ``stages`` deep."""

    block_m: int
    warps: int
    programs_per_sm: int = 0
    hidden_chunk: int = 0
    stages: int = 1


class BackwardConfig(NamedTuple):
    """The backward's tile and warps; ``hidden_chunk`` 0: every program computes everything (the weight
    gradients' accumulators whole in registers), else programs split by role (``_backward_by_role``)."""

    block_m: int
    warps: int
    hidden_chunk: int = 0


# Forward with both weights on chip: the autotuner measures which pays. Every candidate is compiled ahead of time
# for every family in tests/test_kernels_aot.py (with triton 3.6 and 3.9); sm_90's and sm_80's register reports
# decided them.
FORWARD_CONFIGS = [ForwardConfig(64, 4, 0), ForwardConfig(128, 4, 0), ForwardConfig(128, 8, 0),
                   ForwardConfig(64, 4, 2), ForwardConfig(128, 8, 2)]
# Forward with the weights streamed, keyed (family, element size). The fp32 accumulator of the output row tile
# (BLOCK_M x WIDTH) lives in registers across the hidden chunks: 8 warps; at width 256, 128 rows reach 230-254
# registers in 16-bit on sm_90 (no spill) and spill with an fp32 x (autocast: 292-660 bytes on sm_90) or on sm_80 (12
# bytes); 64 rows on 4 warps spill (sm_80: 128 bytes; sm_90: 0 bytes at 237-255 registers). Chunks of 64 hidden
# units need 172 KB of shared memory (sm_90, 3 stages would not fit), fp32 chunks of 32 spill at width 256.
# The other families compiled: 128 rows spill on sm_100 too (64 bytes); gfx950 spills (16-bit 8-14 bytes with triton
# 3.6, fp32 18 bytes). A family missing here streams nothing at that element size: the forward stops at
# WEIGHTS_ON_CHIP_WIDTH.
_ROWS_64 = {2: [ForwardConfig(64, 8, 0, 32, 3)], 4: [ForwardConfig(64, 8, 0, 16, 3)]}
# With the final ReLU's sign bits written (recompute), fp32 chunks spill on sm_86 and sm_120 (16 and 8 bytes, triton
# 3.6): those families stream 16-bit weights only.
STREAMED_CONFIGS = {
    ("hopper", 2): [ForwardConfig(64, 8, 0, 32, 3), ForwardConfig(128, 8, 0, 32, 2)], ("hopper", 4): _ROWS_64[4],
    **{(family, size): configs for family in ("ampere", "consumer", "blackwell", "blackwell_consumer", "cdna2",
                                              "cdna3") for size, configs in _ROWS_64.items()
       if not (size == 4 and family in ("consumer", "blackwell_consumer"))},
}
# On-chip candidates that spill on a family beyond width 32, keyed (family, element size): (BLOCK_M, warps).
# gfx950 fp32 at width 64: 128 rows on 8 wavefronts (32 registers); 16-bit at width 128 writing the sign bits (16
# VGPRs, triton 3.9).
FORWARD_SPILLS = {("cdna4", 4): {(128, 8)}, ("cdna4", 2): {(128, 8)}}
# On-chip candidates that spill at any width where the sign bits are written: sm_100 fp32 128 rows (8 warps: 64-96
# bytes at width 32; 4 warps: 32 bytes at width 16, triton 3.9). Dropped there for every launch (the shape test
# that decides the route does not know whether the bits are written).
FORWARD_SPILLS_ANY_WIDTH = {("blackwell", 4): {(128, 8), (128, 4)}}
ALL_FORWARD_CONFIGS = list(dict.fromkeys(FORWARD_CONFIGS + [c for cs in STREAMED_CONFIGS.values() for c in cs]))
INTERPRETER_BLOCK_M = 32
INTERPRETER_HIDDEN_CHUNK = 32
# Families whose software pipeliner keeps every stage of the streamed weight chunks in shared memory (sm_90's
# TMA/wgmma pipeline); the others keep one fewer (sm_80's cp.async pipeline keeps stages - 1 in flight).
ALL_STAGES_BUFFERED = {"hopper", "blackwell"}
# With an fp32 x (autocast), sm_100's keeps one fewer (90 KB where three stages need 96 KB, triton 3.6 and 3.9).
ALL_STAGES_BUFFERED_WIDE_X = {"hopper"}

# Widest padded feature count each kernel takes. Forward, by element size: both weights on chip up to
# WEIGHTS_ON_CHIP_WIDTH (shared memory for both and two tiles), streamed beyond. Backward, by family: whole
# accumulators in every program to MAX_BACKWARD_WIDTH_WHOLE (they and five tiles spill registers at width 64 on
# sm_80 in every configuration tried, not on sm_90), programs split by role beyond (sm_90 only: on sm_80 the split
# spills at width 128 on 4 warps and sits at 255 registers on 8, and fp32 needs 172 KB of shared memory).
WEIGHTS_ON_CHIP_WIDTH = {2: 128, 4: 64}
MAX_FORWARD_WIDTH = {2: 256, 4: 256}
MAX_BACKWARD_WIDTH_WHOLE = 64
# gfx90a and gfx942 spill at width 32 (fp32 1-3 registers, an fp32 x 22).
MAX_BACKWARD_WIDTH = {"hopper": 128, "blackwell": 128, "ampere": 32, "consumer": 32, "blackwell_consumer": 32,
                      "cdna2": 16, "cdna3": 16, "cdna4": 32}


def padded_width(features: int) -> int:
    return max(16, next_power_of_2(features))


def max_forward_width(element_size: int, x_element_size: int | None = None) -> int:
    """Widest padded width the forward takes with weights of ``element_size`` bytes and ``x`` of
    ``x_element_size`` (wider under autocast). The same for both: an fp32 ``x`` narrows only the configs
    (``forward_configs``), which the ahead-of-time compiles check at every width."""
    return MAX_FORWARD_WIDTH[element_size]


def forward_shared_bytes(config: ForwardConfig, width: int, element_size: int, x_element_size: int | None,
                         family: str) -> int:
    """Upper bound of the forward's shared memory with ``config`` (checked against the compiler's figure for every
    case compiled ahead of time): the x tile as a dot operand (in its own dtype and rounded when it is wider than
    the weights), then either h and both weights (on chip), or ``stages`` buffers of a chunk of each weight and two
    h chunks (streamed; one buffer fewer outside ``ALL_STAGES_BUFFERED``)."""
    block_m, chunk, stages = config.block_m, config.hidden_chunk, config.stages
    x_bytes = block_m * width * (element_size + max(0, (x_element_size or element_size) - element_size))
    if chunk == 0:
        return x_bytes + (block_m * width + 2 * width * width) * element_size
    buffers = stages if family in ALL_STAGES_BUFFERED else max(1, stages - 1)
    return x_bytes + (buffers * 2 * chunk * width + 2 * block_m * chunk) * element_size


def forward_configs(width: int, element_size: int, wide_x: bool, family: str) -> list[ForwardConfig]:
    """Forward candidates at a padded width for weights of ``element_size`` bytes on a device of ``family``
    (before the shared-memory check, ``runnable_forward_configs``). On chip: 128 rows on 4 warps spill from width
    32 up, and persistent programs (weights live across tiles) at width 128. ``wide_x``: x wider than the weights
    (autocast)."""
    if width > MAX_FORWARD_WIDTH[element_size] or family not in MAX_BACKWARD_WIDTH:
        return []  # (a device of no known family: the two-GEMM kernels only)
    if width > WEIGHTS_ON_CHIP_WIDTH[element_size]:
        configs = STREAMED_CONFIGS.get((family, element_size), [])
        return [c for c in configs if not (wide_x and c.block_m > 64)]  # 128 rows spill with an fp32 x
    configs = FORWARD_CONFIGS if width <= 16 else [c for c in FORWARD_CONFIGS if c[:2] != (128, 4)]
    configs = [c for c in configs if c[:2] not in FORWARD_SPILLS_ANY_WIDTH.get((family, element_size), ())]
    if width > 32:
        configs = [c for c in configs if c[:2] not in FORWARD_SPILLS.get((family, element_size), ())]
    if width > 64:  # and an fp32 x tile spills 64 rows on 4 warps (sm_80, 96 bytes)
        configs = [c for c in configs if c.programs_per_sm == 0 and not (wide_x and c[:2] == (64, 4))]
    return configs


def runnable_forward_configs(width: int, element_size: int, x_element_size: int, family: str,
                             shared_limit: int) -> list[ForwardConfig]:
    """The forward candidates that fit a device's shared memory per block (``shared_limit`` bytes): the
    autotuner's prune and the backend's test of whether the whole block runs at all."""
    return [c for c in forward_configs(width, element_size, x_element_size > element_size, family)
            if forward_shared_bytes(c, width, element_size, x_element_size, family) <= shared_limit]


def max_backward_width(family: str) -> int:
    """The whole-block backward's widest padded width on a device of ``family`` (0: it takes none)."""
    return MAX_BACKWARD_WIDTH.get(family, 0)


def backward_config(width: int, element_size: int, wide: bool, family: str, recompute: bool = False) -> BackwardConfig:
    """The backward's fixed choice on a device of ``family`` (its workspace size depends on the tile count, so it
    is not autotuned). ``wide``: x and dx in fp32 next to 16-bit weights (autocast): 64-row tiles spill at width 64
    on sm_90 (8-52 bytes), and 32-row ones lose wgmma below it. Compiled for the other families: on sm_100 under
    autocast, 8 warps spill at width 16 (48 bytes at 128 registers) and 32 rows at width 64 (24 bytes, triton 3.6),
    and fp32 32-row tiles compile to mma.sync; on sm_86 and sm_120, 8 warps spill at width 16 in 16-bit (12-24
    bytes, triton 3.6). (A wider ``dout`` spills more: ``takes_dout`` refuses it.)
    Beyond MAX_BACKWARD_WIDTH_WHOLE, roles with chunks of 32 hidden units: 16-bit 64 rows on 8 warps (212-222
    registers on sm_90; 4 warps spill with an fp32 x), fp32 32 rows (127; 64 rows sit at 255). ``recompute``: the
    hidden layer computed again on chip needs room for one more product: 32-row tiles in 16-bit beyond the whole
    width (64 spill 8 bytes on sm_90 without a final ReLU) and with a wide x below width 64 (60 bytes on sm_80; on
    sm_90 32 rows lose wgmma there, and 64 rows on 8 warps fit: 138-255 registers); on sm_90 in 16-bit at width 64
    (64 rows spill 48 bytes with triton 3.6; 32 rows: 130-172 registers, wgmma kept). sm_100 likewise (triton 3.6:
    with a wide x below width 64, 32 rows lose tcgen05 and 64 rows on 8 warps fit, 163-246 registers; in 16-bit at
    width 64, 64 rows spill 16-36 bytes and 32 rows keep tcgen05 at 80 registers)."""
    if width > MAX_BACKWARD_WIDTH_WHOLE:
        return BackwardConfig(64 if element_size == 2 and not recompute else 32, 8, 32)
    if wide:
        if family == "blackwell" and not recompute:
            return BackwardConfig(64, 4) if width <= 16 else BackwardConfig(64, 8)
        if recompute and family in ("hopper", "blackwell") and width < 64:
            return BackwardConfig(64, 8)
        return BackwardConfig(32, 8) if width >= 64 or recompute else BackwardConfig(64, 8)
    if recompute and family in ("hopper", "blackwell") and element_size == 2 and width >= 64:
        return BackwardConfig(32, 8)
    if family == "blackwell" and element_size == 4 and width <= 32:
        return BackwardConfig(64, 8)  # (255 registers, no spill)
    if family in ("consumer", "blackwell_consumer") and element_size == 2 and width <= 16:
        return BackwardConfig(64, 4)
    return BackwardConfig(64, 8) if element_size == 2 or width <= 16 else BackwardConfig(32, 8)


def dx_share(width: int, hidden_chunk: int) -> int:
    """dx programs per group of the role split: dx's ``4 F^2`` FLOPs per row over a weight chunk's ``6 F chunk``."""
    return max(1, round(2 * width / (3 * hidden_chunk)))


def takes_dout(dout_element_size: int, element_size: int) -> bool:
    """Whether the backward takes a ``dout`` of this size with weights of ``element_size``: not a wider one (the
    FFN form under autocast, whose output is fp32), which spills registers."""
    return dout_element_size <= element_size


def prune(configs, named_args, **kwargs):
    """The autotuner's early prune, before anything compiles: the candidates this width, these dtypes and this
    device run (``runnable_forward_configs``)."""
    args = {**named_args, **kwargs}
    x, w1 = args["x_ptr"], args["w1_ptr"]
    allowed = set(runnable_forward_configs(args["WIDTH"], w1.element_size(), x.element_size(),
                                           _common.family(x.device).name, _common.max_shared_memory(x.device)))
    return [c for c in configs if config_of(c) in allowed]


def config_of(c: triton.Config) -> ForwardConfig:
    return ForwardConfig(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["PROGRAMS_PER_SM"], c.kwargs["HIDDEN_CHUNK"],
                         c.num_stages)
