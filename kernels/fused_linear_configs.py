"""The fused linear kernel's autotune candidates and the rules that prune them, per device, dtype and epilogue.

Plain Python (no triton): the config tables, the spill rules the ahead-of-time compiles decided, the Hopper
schedules' features, and ``prune``, the autotuner's early prune hook (it reads only the candidates' fields). The
kernel is ``fused_linear_kernel.py``; ``fused_linear.py`` builds its autotuner from ``ALL_ENTRIES`` and ``prune``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..activations import ACTIVATIONS, IDENTITY
from . import _common
from ._common import next_power_of_2

if TYPE_CHECKING:
    import triton

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Every entry is compiled ahead of time for its
# architecture, dtype class and epilogue in tests/test_kernels_aot.py: it must fit shared memory and not spill.
HOPPER_16BIT = [
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 4),
    (64, 16, 16, 3, 4),
]
AMPERE_16BIT = [
    (128, 256, 32, 3, 8),
    (128, 128, 32, 4, 8),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 16, 16, 3, 4),
]
ANY_32BIT = [
    (128, 128, 32, 3, 8),
    (64, 128, 32, 3, 4),
    (128, 64, 32, 3, 4),
    (64, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
    (32, 16, 16, 3, 4),
]
# Hopper schedules: more candidates for sm_90 fp16/bf16 beside the classic ones above (the autotuner keeps
# whichever is faster). (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, schedule), the schedule naming its
# features, "+"-joined (SCHEDULE_FEATURES): "tma", the operand tiles copied by the tensor memory accelerator through
# device-side descriptors (only where tma_layout() qualifies every operand of the K loop); "persistent", one
# program per SM walking the tiles (persistent_grid()); "split", the epilogue in two (BLOCK_M, BLOCK_N / 2) halves,
# so that 128 x 256 takes a residual or gate tile; "ws", the K loop warp-specialized by Triton's Hopper partitioner
# (a producer warp group issues the copies, two consumer warp groups of num_warps each take half the rows of the
# tile). Not offered to autocast (wide) or heavy-activation launches: the classic tiles serve them.
HOPPER_SCHEDULES = [
    (128, 256, 64, 3, 8, "tma+persistent+split"),
    (128, 128, 64, 4, 8, "tma+persistent"),
    (128, 128, 64, 4, 8, "tma"),
    (128, 256, 64, 3, 4, "tma+persistent+ws"),
]
# Warp specialization only where both tritons partition the loop and the result does not spill (compiled for
# sm_90): with triton 3.6 the partitioner fails on two K loops (a second operand pair) and on the split epilogue
# (reshape / split), and with split-K (its arrival atomics in the tile loop) it leaves the loop unpartitioned, so
# that 4 warps spill a 128 x 256 accumulator; row sums spill 8 bytes. So: no split, and not offered to launches with
# a second pair, split-K or row sums (config_table's warp_specialize).
# Schedule feature -> the kernel's constexpr and its value.
SCHEDULE_FEATURES = {"tma": ("TMA", True), "persistent": ("PERSISTENT", True), "ws": ("WARP_SPECIALIZE", True),
                     "split": ("EPILOGUE_SPLIT", 2)}
# What the interpreter runs (no autotuning there): small tiles keep it quick and exercise the ragged edges.
INTERPRETER_CONFIG = (32, 32, 16, 1, 4)
# A residual or gate tile read in the epilogue needs registers next to the accumulator: with it, tiles above
# 128 x 128 spill, so they are kept for the plain and bias epilogues; a "split" schedule's halves count (but with
# the mask on A too, g1 = (dout' W2) * relu'(h), the split 128 x 256 still spills: 16 bytes with triton 3.9, 40
# with 3.6).
MAX_TILE_WITH_TILE_EPILOGUE = 128 * 128
# On sm_8x these fp32 (TF32) tiles spill (24 bytes at 168 registers) in the backward gate and dx + residual
# epilogues with triton 3.6, the GPU image's version; 3.9 fits them. Dropped from every tile epilogue and triton
# version on sm_8x, one rule for all: 64 x 128 and 128 x 128 remain as large tiles.
AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE = [(128, 64, 32, 3, 4)]
# The ReLU-backward mask on A (two tiles loaded per K step, A modified in registers before the dot) spills with
# 128 x 64 tiles on 4 warps (sm_90 fp16/bf16 128 bytes, sm_80 bf16 24 bytes; others at 255 registers): dropped
# for masked-A launches. (Masking through the load's predicate instead keeps registers low but stops Triton from
# pipelining the A loads.)
MASKED_A_SPILLS = [(128, 64, 4)]
# Autocast launches (an fp32 operand, residual or output next to a 16-bit GEMM) spill with these tiles, keyed
# (sm_90 or later, (BLOCK_M, BLOCK_N, BLOCK_K)): with x as B of a weight gradient, 128 x 256 on sm_90 (112 bytes;
# 255 registers in other variants on sm_80) and 64 x 32 on sm_80 in fp16 (24 bytes); with triton 3.6 also
# 64 x 128 on 4 warps (sm_90 24 bytes; sm_80 fp16 20 bytes in the projection).
WIDE_SPILLS = {(True, (128, 256, 64)), (True, (64, 128, 64)), (False, (128, 256, 32)), (False, (64, 128, 32)),
               (False, (64, 32, 32))}
# Launches that compute a "heavy" activation (the registry's register_class: gelu, gelu_tanh, silu) keep only these
# tiles per place, keyed (sm_90 or later, fp32), and the small ones (<= SMALL_TILE elements); "light" ones (ReLU) take
# every tile, as a launch without an activation does. Compiled with triton 3.6 and 3.9, the others
# spill: 128 x 256 everywhere (24-1280 bytes); in the gate (acc * act'(pre)) 128 x 128 on sm_90 (silu, 16-88 bytes)
# and 64 x 128 on sm_80 (silu, 3.6) or at 255 registers; with act on B's load 64 x 128 on sm_90 (the gelus) and on
# sm_80 (gelu_tanh, 3.6); in the epilogue 128 x 64 on 4 warps with an fp32 x (gelu_tanh). Fewer candidates also keep
# the ahead-of-time compiles and the first call's autotuning short.
HEAVY_TILES = {
    "epilogue": {(True, False): {(128, 128), (64, 64)}, (False, False): {(64, 128), (64, 64)},
                 (True, True): {(64, 128), (64, 64)}, (False, True): {(64, 128), (64, 64)}},
    "gate": {(True, False): {(64, 64)}, (False, False): {(64, 64)}, (True, True): {(64, 64)},
             (False, True): {(64, 64)}},
    "b": {(True, False): {(128, 128), (64, 64)}, (False, False): {(64, 64)}, (True, True): {(64, 128), (64, 64)},
          (False, True): {(64, 128), (64, 64)}},
}
SMALL_TILE = 64 * 32


def config_table(
    capability: tuple[int, int], element_size: int, tile_epilogue: bool = False, masked_a: bool = False,
    wide: bool = False, heavy: tuple[str, ...] = (), tma: bool = False, warp_specialize: bool = False,
) -> list[tuple]:
    """The autotune candidates for a device of ``capability``, a GEMM in ``element_size`` bytes, whether the
    epilogue reads a residual or gate tile, whether A is masked on load, whether an operand, the residual or
    the output is wider than the GEMM's dtype (autocast), where a heavy activation is computed (``"epilogue"``,
    ``"gate"``, ``"b"``: keys of HEAVY_TILES, ``heavy_places``), whether the operands qualify for TMA
    (``tma_layout``), and whether the launch may be warp-specialized (no second operand pair, split-K or row
    sums)."""
    if element_size >= 4:
        table = ANY_32BIT
    else:
        table = HOPPER_16BIT if capability[0] >= 9 else AMPERE_16BIT
    if capability[0] >= 9 and element_size == 2 and not wide and not heavy:
        table = table + [e for e in HOPPER_SCHEDULES if (tma or "tma" not in features(e))
                         and (warp_specialize or "ws" not in features(e))]
    if tile_epilogue:
        table = [e for e in table if e[0] * e[1] <= MAX_TILE_WITH_TILE_EPILOGUE * (
            2 if "split" in features(e) and not masked_a else 1)]
        if element_size >= 4 and capability[0] < 9:
            table = [e for e in table if e not in AMPERE_32BIT_SPILLS_WITH_TILE_EPILOGUE]
    if masked_a:
        table = [e for e in table if (e[0], e[1], e[4]) not in MASKED_A_SPILLS]
    if wide:
        table = [e for e in table if (capability[0] >= 9, e[:3]) not in WIDE_SPILLS]
    for place in heavy:
        keep = HEAVY_TILES[place][(capability[0] >= 9, element_size >= 4)]
        table = [e for e in table if e[:2] in keep or e[0] * e[1] <= SMALL_TILE]
    return table


def features(entry: tuple) -> tuple[str, ...]:
    """The Hopper schedule features of a config table entry (none for the classic 5-tuples)."""
    return tuple(entry[5].split("+")) if len(entry) > 5 else ()


def heavy_places(activation: str, gate: str, b_activation: str) -> tuple[str, ...]:
    """Where a launch with these constexprs computes an activation of the registry's "heavy" register class
    (config_table's ``heavy``)."""
    places = (("epilogue", activation), ("gate", gate), ("b", b_activation))
    return tuple(place for place, name in places
                 if name != IDENTITY and ACTIVATIONS[name].register_class == "heavy")


def schedule_constexprs(entry: tuple) -> dict:
    """The kernel's constexprs for a config table entry's schedule (empty for the classic kernel: the defaults)."""
    return dict(SCHEDULE_FEATURES[f] for f in features(entry))


def persistent_grid(tiles: int, split_k: int, sms: int) -> tuple[int, int]:
    """(programs, K slices) of a persistent launch: at most one program per SM. Split-K takes as many of the
    ``split_k`` slices as fill the SMs beside the tiles (deterministic: shape, config and SM count decide)."""
    splits = min(split_k, max(1, sms // tiles))
    return min(tiles, max(1, sms // splits)), splits


# The Hopper schedules first: the prune hook's fallback for tiny problems is the last (smallest) classic tile.
ALL_ENTRIES = list(dict.fromkeys(HOPPER_SCHEDULES + HOPPER_16BIT + AMPERE_16BIT + ANY_32BIT))


def prune(configs, named_args, **kwargs):
    """Keep the candidates of this device and dtype, and drop tiles far larger than the problem."""
    args = {**named_args, **kwargs}  # the flags arrive as keywords
    a = args["a_ptr"]
    size = min(a.element_size(), args["b_ptr"].element_size())  # the GEMM's dtype: the narrower operand
    wide = max(args[n].element_size() for n in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")) > size
    tile_epilogue = args["HAS_RESIDUAL"] or args["GATE"] != IDENTITY
    heavy = heavy_places(args["ACTIVATION"], args["GATE"], args["B_ACTIVATION"])
    warp_specialize = not (args["HAS_SECOND"] or args["HAS_ROWSUM"] or args["SPLIT_K"] > 1)
    allowed = set(config_table(_common.capability(a.device), size, tile_epilogue, args["MASK"] == "a", wide, heavy,
                               args["TMA_LAYOUT"] != "", warp_specialize))
    m, n, k = args["M"], args["N"], max(args["K"], args["K2"])
    fits = [c for c in configs if config_key(c) in allowed]
    small = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(n))
             and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k))
             and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))]
    return small or fits[-1:]


def config_key(c: triton.Config) -> tuple:
    """The config table entry of an autotune config."""
    key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
    schedule = "+".join(f for f, (name, value) in SCHEDULE_FEATURES.items() if c.kwargs.get(name) == value)
    return (*key, schedule) if schedule else key
