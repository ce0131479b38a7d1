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

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps[, schedule]). Every entry is compiled ahead of time for each
# family it is offered to, in each dtype class and epilogue, in tests/test_kernels_aot.py: it must compile, fit the
# family's shared memory (LDS on AMD) and not spill. The tables are keyed by device family (``_common.family``).
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
# sm_86 (triton 3.6): 128 x 64 spills with split-K and row sums (24 bytes); sm_120 (3.6): 64 x 128 on 4 warps with a
# second operand pair (8 bytes).
CONSUMER_16BIT = [e for e in AMPERE_16BIT if e[:2] != (128, 64)]
BLACKWELL_CONSUMER_16BIT = [e for e in AMPERE_16BIT if e[:2] != (64, 128)]
ANY_32BIT = [
    (128, 128, 32, 3, 8),
    (64, 128, 32, 3, 4),
    (128, 64, 32, 3, 4),
    (64, 64, 32, 4, 4),
    (32, 32, 32, 4, 4),
    (32, 16, 16, 3, 4),
]
# Two stages of 128 x 128 x 32 fp32 tiles: with about 99 KB of shared memory (sm_86, sm_89, sm_120) three need
# 100 KB with split-K's reduction (102,400 bytes compiled for sm_86 and sm_120); on sm_100 three spill with a second
# operand pair (8 bytes at 128 registers).
TWO_STAGE_32BIT = [(128, 128, 32, 2, 8)] + ANY_32BIT[1:]
# sm_100: tcgen05 takes tiles of 64 rows or more (32-row ones compile to mma.sync): 64-row small tiles.
BLACKWELL_32BIT = TWO_STAGE_32BIT[:4] + [(64, 32, 32, 4, 4), (64, 16, 16, 3, 4)]
# sm_120 (triton 3.6): 128 x 64 spills with a second operand pair (32 bytes), 32 x 32 with split-K (12 bytes).
BLACKWELL_CONSUMER_32BIT = [e for e in TWO_STAGE_32BIT if e[:2] not in ((128, 64), (32, 32))]
# AMD Instinct (wavefronts of 64: num_warps counts wavefronts). Two stages: Triton's AMD pipeliner streams one tile
# ahead through LDS. The AMD knobs are schedule tokens (AMD_OPTIONS): "eu<n>" asks the compiler for n waves per
# SIMD (waves_per_eu: it caps registers for that occupancy), "mfma16" the 16 x 16 matrix instructions
# (matrix_instr_nonkdim), "kpack2" two K elements packed per LDS read (kpack; gfx950 has dropped it).
# 256 x 256 tiles spill there in most epilogues (gfx90a, gfx942, gfx950; and need 193-198 KB of LDS on gfx950), and
# two waves per SIMD (eu2) on 4 wavefronts spills a 128 x 128 tile with a gate or a split-K epilogue: not offered;
# on gfx90a and gfx942 a 128 x 128 tile on 4 wavefronts spills 42-46 SGPRs in the gate epilogue: 8 there.
CDNA_16BIT = [
    (128, 256, 32, 2, 8, "eu2"),
    (128, 128, 64, 2, 8, "eu2+mfma16+kpack2"),
    (128, 128, 32, 2, 8),
    (64, 128, 64, 2, 4, "mfma16+kpack2"),
    (128, 64, 64, 2, 4, "mfma16+kpack2"),
    (64, 64, 64, 2, 4, "mfma16"),
    (64, 32, 32, 2, 4),
    (32, 16, 16, 2, 4),
]
CDNA4_16BIT = [
    (128, 256, 64, 2, 8, "eu2"),
    (128, 128, 64, 3, 8, "eu2+mfma16"),
    (128, 128, 64, 2, 4),
    (64, 128, 64, 2, 4, "mfma16"),
    (128, 64, 64, 2, 4, "mfma16"),
    (64, 64, 64, 2, 4, "mfma16"),
    (64, 32, 32, 2, 4),
    (32, 16, 16, 2, 4),
]
CDNA_32BIT = [
    (128, 128, 32, 2, 8, "eu2"),
    (64, 128, 32, 2, 4),
    (128, 64, 32, 2, 4),
    (64, 64, 32, 2, 4, "mfma16"),
    (32, 32, 32, 2, 4),
    (32, 16, 16, 2, 4),
]
# A device of no known family (``_common.OTHER``): small classic tiles within 48 KB of shared memory, compiled for
# sm_75 (where Triton has no 16-bit matrix instruction: 64 x 64 spills 1-2 KB there).
OTHER_16BIT = [(64, 32, 32, 2, 4), (32, 32, 32, 2, 4), (32, 16, 16, 2, 4)]
OTHER_32BIT = [(64, 64, 32, 2, 4), (32, 32, 32, 2, 4), (32, 16, 16, 2, 4)]
# Family -> (16-bit classic tiles, 32-bit tiles).
CLASSIC = {
    "hopper": (HOPPER_16BIT, ANY_32BIT), "blackwell": (HOPPER_16BIT, BLACKWELL_32BIT),
    "ampere": (AMPERE_16BIT, ANY_32BIT), "consumer": (CONSUMER_16BIT, TWO_STAGE_32BIT),
    "blackwell_consumer": (BLACKWELL_CONSUMER_16BIT, BLACKWELL_CONSUMER_32BIT),
    "cdna2": (CDNA_16BIT, CDNA_32BIT), "cdna3": (CDNA_16BIT, CDNA_32BIT), "cdna4": (CDNA4_16BIT, CDNA_32BIT),
    "other": (OTHER_16BIT, OTHER_32BIT),
}
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
# Family -> its schedules (TMA, persistent, warp-specialized), offered to fp16/bf16 launches beside the classic
# tiles; families with TMA only (``_common.Family.tma``). sm_100 (its accumulator in tensor memory, read out to
# registers for the epilogue): the 128 x 256 ones spill (split with split-K 176 bytes, warp-specialized 272-1296),
# and with triton 3.6 the non-persistent "tma" one with split-K (32 bytes). sm_120 (99 KB, mma.sync): none; those
# that fit spilled (128 x 64 x 64 persistent with a second pair or split-K 16-76 bytes; 128 x 128 x 32 "tma" with
# a second pair, 52 bytes with 3.6).
SCHEDULES = {"hopper": HOPPER_SCHEDULES, "blackwell": [(128, 128, 64, 4, 8, "tma+persistent")]}
# Schedule feature -> the kernel's constexpr (or, for the AMD knobs, the compile option) and its value.
SCHEDULE_FEATURES = {"tma": ("TMA", True), "persistent": ("PERSISTENT", True), "ws": ("WARP_SPECIALIZE", True),
                     "split": ("EPILOGUE_SPLIT", 2)}
AMD_OPTIONS = {"eu1": ("waves_per_eu", 1), "eu2": ("waves_per_eu", 2), "eu3": ("waves_per_eu", 3),
               "mfma16": ("matrix_instr_nonkdim", 16), "mfma32": ("matrix_instr_nonkdim", 32),
               "kpack2": ("kpack", 2)}
SCHEDULE_FEATURES.update(AMD_OPTIONS)
# What the interpreter runs (no autotuning there): small tiles keep it quick and exercise the ragged edges.
INTERPRETER_CONFIG = (32, 32, 16, 1, 4)
# A residual or gate tile read in the epilogue needs registers next to the accumulator: with it, tiles above
# 128 x 128 spill, so they are kept for the plain and bias epilogues; a "split" schedule's halves count (but with
# the mask on A too, g1 = (dout' W2) * relu'(h), the split 128 x 256 still spills: 16 bytes with triton 3.9, 40
# with 3.6). Per family (sm_90, sm_80 measured first; the rest compiled the same way).
MAX_TILE_WITH_TILE_EPILOGUE = {"hopper": 128 * 128, "ampere": 128 * 128, "consumer": 128 * 128,
                               "blackwell": 128 * 128, "blackwell_consumer": 128 * 128, "cdna2": 128 * 128,
                               "cdna3": 128 * 128, "cdna4": 128 * 128, "other": 64 * 64}
# Tiles dropped from every fp32 launch with a tile epilogue, per family: on sm_8x (128, 64, 32, 3, 4) spills (24
# bytes at 168 registers) in the backward gate and dx + residual epilogues with triton 3.6, the GPU image's version;
# 3.9 fits it. One rule for both versions: 64 x 128 and 128 x 128 remain as large tiles.
SPILLS_32BIT_WITH_TILE_EPILOGUE = {"ampere": [(128, 64, 32, 3, 4)], "consumer": [(128, 64, 32, 3, 4)]}
# The ReLU-backward mask on A (two tiles loaded per K step, A modified in registers before the dot) spills with
# these (BLOCK_M, BLOCK_N, num_warps), keyed (family, fp32), dropped for masked-A launches: 128 x 64 on 4 warps
# (sm_90 fp16/bf16 128 bytes, sm_80 bf16 24 bytes; others at 255 registers); on sm_120 64 x 128 too (16-bit split-K
# 12-28 bytes, fp32 8-160 bytes); on sm_100 fp32 128 x 128 (8 bytes at 128 registers). (Masking through the load's
# predicate instead keeps registers low but stops Triton from pipelining the A loads.)
MASKED_A_SPILLS = {
    **{(family, fp32): {(128, 64, 4)} for family in ("hopper", "ampere", "consumer") for fp32 in (False, True)},
    ("blackwell", True): {(128, 128, 8)},
    **{("blackwell_consumer", fp32): {(128, 64, 4), (64, 128, 4)} for fp32 in (False, True)},
}
# Autocast launches (an fp32 operand, residual or output next to a 16-bit GEMM) spill with these (BLOCK_M, BLOCK_N,
# BLOCK_K), per family: with x as B of a weight gradient, 128 x 256 on sm_90 (112 bytes; 255 registers in other
# variants on sm_80) and 64 x 32 on sm_80 in fp16 (24 bytes); with triton 3.6 also 64 x 128 on 4 warps (sm_90 24
# bytes; sm_80 fp16 20 bytes in the projection); 128 x 128 on sm_86 (24 bytes; on sm_120 it needs 100 KB of shared
# memory), 128 x 256 on sm_100 (80 bytes), sm_120 (60 bytes) and gfx950 (70-81 bytes).
WIDE_SPILLS = {"hopper": {(128, 256, 64), (64, 128, 64)},
               "ampere": {(128, 256, 32), (64, 128, 32), (64, 32, 32)},
               "consumer": {(128, 256, 32), (128, 128, 32), (64, 128, 32), (64, 32, 32)},
               "blackwell": {(128, 256, 64), (64, 128, 64)},
               "blackwell_consumer": {(128, 256, 32), (128, 128, 32), (64, 128, 32), (64, 32, 32)},
               "cdna4": {(128, 256, 64)}}
# Launches that compute a "heavy" activation (the registry's register_class: gelu, gelu_tanh, silu) keep only these
# (BLOCK_M, BLOCK_N) per place, keyed (family, fp32), and the small ones (<= SMALL_TILE elements); "light" ones
# (ReLU) take every tile, as a launch without an activation does. Compiled with triton 3.6 and 3.9, the others
# spill: 128 x 256 everywhere (24-1280 bytes); in the gate (acc * act'(pre)) 128 x 128 on sm_90 (silu, 16-88 bytes)
# and 64 x 128 on sm_80 (silu, 3.6) or at 255 registers; with act on B's load 64 x 128 on sm_90 (the gelus) and on
# sm_80 (gelu_tanh, 3.6); in the epilogue 128 x 64 on 4 warps with an fp32 x (gelu_tanh). Fewer candidates also keep
# the ahead-of-time compiles and the first call's autotuning short. A family missing here keeps the small tiles.
HEAVY_TILES = {
    "epilogue": {("hopper", False): {(128, 128), (64, 64)}, ("ampere", False): {(64, 128), (64, 64)},
                 ("hopper", True): {(64, 128), (64, 64)}, ("ampere", True): {(64, 128), (64, 64)}},
    "gate": {("hopper", False): {(64, 64)}, ("ampere", False): {(64, 64)}, ("hopper", True): {(64, 64)},
             ("ampere", True): {(64, 64)}},
    "b": {("hopper", False): {(128, 128), (64, 64)}, ("ampere", False): {(64, 64)},
          ("hopper", True): {(64, 128), (64, 64)}, ("ampere", True): {(64, 128), (64, 64)}},
}
# The other families take the tiles of sm_90 (blackwell) or sm_80 (the rest), compiled for each (tests/
# test_kernels_aot.py), less what spills there: the fp32 64 x 64 gelu epilogue on sm_100 (48 bytes), the gelus on
# B's load at 16-bit 128 x 128 on sm_100 (28-48 bytes, 3.6) and 64 x 64 on sm_120 (24-36 bytes).
for _place in HEAVY_TILES.values():
    for _fp32 in (False, True):
        _place[("blackwell", _fp32)] = _place[("hopper", _fp32)]
        for _family in ("consumer", "blackwell_consumer", "cdna2", "cdna3", "cdna4"):
            _place[(_family, _fp32)] = _place[("ampere", _fp32)]
HEAVY_TILES["epilogue"][("blackwell", True)] = {(64, 128)}
HEAVY_TILES["b"][("blackwell", False)] = {(64, 64)}
HEAVY_TILES["b"][("blackwell_consumer", False)] = set()
SMALL_TILE = 64 * 32
# Launches with packed sign bits (the recompute path) spill where their Q-mask twins fit (compiled for sm_90 and
# sm_80 with triton 3.6 and 3.9): reading a weight gradient's bits on k (SIGN_BITS == 2), 16-bit 128 x 256 tiles
# (sm_90 324 bytes, sm_80 12-88 bytes: tiles above the tile epilogue's limit are dropped, on every family) and fp32
# 64 x 128 with a heavy activation on B's load (sm_80 24 bytes: dropped wherever sm_80's heavy tiles are taken);
# writing the bits (STORE_SIGNS), 16-bit 64 x 64 on sm_80 (12 bytes at 80 registers, triton 3.6).
BITS_ON_K_HEAVY_B_SPILLS = {family: {(64, 128)} for family in ("ampere", "consumer", "blackwell_consumer", "cdna2",
                                                                 "cdna3", "cdna4")}
# Also gfx942 16-bit 128 x 256 under autocast with a shortcut (4 SGPRs) and gfx950 16-bit 128 x 128 (2-8 SGPRs), 3.9.
STORE_SIGNS_SPILLS = {("ampere", False): {(64, 64)}, ("cdna3", False): {(128, 256)}, ("cdna4", False): {(128, 128)}}
# Reading a weight gradient's bits on k, sm_90's 64 x 32 x 32 tile loses its software pipeline: the masked A stays
# in registers, one stage deep (12 KB of shared memory where three stages of A and B need 18 KB; the Q-mask twin
# keeps all of A, B and Q in flight). Dropped there: the larger tiles pipeline.
BITS_ON_K_UNPIPELINED = {"hopper": {(64, 32, 32)}}
# Tiles that spill reading packed sign bits, keyed (family, fp32, SIGN_BITS): (BLOCK_M, BLOCK_N, BLOCK_K), from every
# family's full ahead-of-time set with triton 3.6 and 3.9 (bytes on NVIDIA, registers on AMD; the weight gradient's
# split-K, autocast and heavy-B variants on k, the gate on m): on k, 16-bit, sm_86 64 x 64 x 32 (24 bytes, 3.6);
# sm_100 64 x 32 x 32 (8-16) and 128 x 64 x 64 (60-284, 3.9); sm_120 32 x 16 x 16 and 64 x 64 x 32 (28-36, 3.9),
# fp32 64 x 64 x 32 (12, 3.9); gfx90a, gfx942 and gfx950 128 x 128 x 64 (4-36 SGPRs, 3.9). On m, fp32 with a heavy
# gate, sm_120 64 x 64 x 32 (12 bytes, 3.6). Dropped for every launch reading bits there.
SIGN_BITS_SPILLS = {
    ("consumer", False, 2): {(64, 64, 32)}, ("blackwell", False, 2): {(64, 32, 32), (128, 64, 64)},
    ("blackwell_consumer", False, 2): {(32, 16, 16), (64, 64, 32)}, ("blackwell_consumer", True, 2): {(64, 64, 32)},
    ("blackwell_consumer", True, 1): {(64, 64, 32)},
    **{(family, False, 2): {(128, 128, 64)} for family in ("cdna2", "cdna3", "cdna4")},
}


def config_table(
    family: str, element_size: int, tile_epilogue: bool = False, masked_a: bool = False,
    wide: bool = False, heavy: tuple[str, ...] = (), tma: bool = False, warp_specialize: bool = False,
    sign_bits: int = 0, store_signs: bool = False,
) -> list[tuple]:
    """The autotune candidates for a device of ``family`` (``_common.Family.name``), a GEMM in ``element_size``
    bytes, whether the epilogue reads a residual or gate tile, whether A is masked on load, whether an operand, the
    residual or the output is wider than the GEMM's dtype (autocast), where a heavy activation is computed
    (``"epilogue"``, ``"gate"``, ``"b"``: keys of HEAVY_TILES, ``heavy_places``), whether the operands qualify for
    TMA (``tma_layout``), whether the launch may be warp-specialized (no second operand pair, split-K or row
    sums), and whether it reads packed sign bits (``sign_bits``: the kernel's SIGN_BITS) or writes them."""
    bits16, bits32 = CLASSIC[family]
    table = bits32 if element_size >= 4 else bits16
    if element_size == 2 and not wide and not heavy:
        table = table + [e for e in SCHEDULES.get(family, ()) if (tma or "tma" not in features(e))
                         and (warp_specialize or "ws" not in features(e))]
    if tile_epilogue:
        table = [e for e in table if e[0] * e[1] <= MAX_TILE_WITH_TILE_EPILOGUE[family] * (
            2 if "split" in features(e) and not masked_a else 1)]
        if element_size >= 4:
            table = [e for e in table if e not in SPILLS_32BIT_WITH_TILE_EPILOGUE.get(family, ())]
    if masked_a:
        table = [e for e in table if (e[0], e[1], e[4]) not in MASKED_A_SPILLS.get((family, element_size >= 4), ())]
    if wide:
        table = [e for e in table if e[:3] not in WIDE_SPILLS.get(family, ())]
    for place in heavy:
        keep = HEAVY_TILES[place].get((family, element_size >= 4), ())
        table = [e for e in table if e[:2] in keep or e[0] * e[1] <= SMALL_TILE]
    if sign_bits == 2 and element_size == 2:
        table = [e for e in table if e[0] * e[1] <= MAX_TILE_WITH_TILE_EPILOGUE[family]
                 and e[:3] not in BITS_ON_K_UNPIPELINED.get(family, ())]
    if sign_bits:
        table = [e for e in table if e[:3] not in SIGN_BITS_SPILLS.get((family, element_size >= 4, sign_bits), ())]
    if sign_bits == 2 and element_size >= 4 and "b" in heavy:
        table = [e for e in table if e[:2] not in BITS_ON_K_HEAVY_B_SPILLS.get(family, ())]
    if store_signs:
        table = [e for e in table if e[:2] not in STORE_SIGNS_SPILLS.get((family, element_size >= 4), ())]
    return table


def features(entry: tuple) -> tuple[str, ...]:
    """The schedule features of a config table entry (none for the classic 5-tuples): the Hopper schedules' and
    the AMD knobs."""
    return tuple(entry[5].split("+")) if len(entry) > 5 else ()


def heavy_places(activation: str, gate: str, b_activation: str) -> tuple[str, ...]:
    """Where a launch with these constexprs computes an activation of the registry's "heavy" register class
    (config_table's ``heavy``)."""
    places = (("epilogue", activation), ("gate", gate), ("b", b_activation))
    return tuple(place for place, name in places
                 if name != IDENTITY and ACTIVATIONS[name].register_class == "heavy")


def schedule_constexprs(entry: tuple) -> dict:
    """The kernel's constexprs (and AMD compile options) for a config table entry's schedule (empty for the classic
    kernel: the defaults)."""
    return dict(SCHEDULE_FEATURES[f] for f in features(entry))


def persistent_grid(tiles: int, split_k: int, sms: int) -> tuple[int, int]:
    """(programs, K slices) of a persistent launch: at most one program per SM. Split-K takes as many of the
    ``split_k`` slices as fill the SMs beside the tiles (deterministic: shape, config and SM count decide)."""
    splits = min(split_k, max(1, sms // tiles))
    return min(tiles, max(1, sms // splits)), splits


# Every family's candidates, the schedules first.
ALL_ENTRIES = list(dict.fromkeys([e for s in SCHEDULES.values() for e in s]
                                 + [e for tables in CLASSIC.values() for table in tables for e in table]))


def prune(configs, named_args, **kwargs):
    """Keep the candidates of this device and dtype, and drop tiles far larger than the problem."""
    args = {**named_args, **kwargs}  # the flags arrive as keywords
    a = args["a_ptr"]
    size = min(a.element_size(), args["b_ptr"].element_size())  # the GEMM's dtype: the narrower operand
    wide = max(args[n].element_size() for n in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")) > size
    tile_epilogue = args["HAS_RESIDUAL"] or args["GATE"] != IDENTITY
    heavy = heavy_places(args["ACTIVATION"], args["GATE"], args["B_ACTIVATION"])
    warp_specialize = not (args["HAS_SECOND"] or args["HAS_ROWSUM"] or args["SPLIT_K"] > 1)
    allowed = set(config_table(_common.family(a.device).name, size, tile_epilogue, args["MASK"] == "a", wide, heavy,
                               args["TMA_LAYOUT"] != "", warp_specialize, args["SIGN_BITS"], args["STORE_SIGNS"]))
    m, n, k = args["M"], args["N"], max(args["K"], args["K2"])
    fits = [c for c in configs if config_key(c) in allowed]
    small = [c for c in fits if c.kwargs["BLOCK_N"] <= max(16, next_power_of_2(n))
             and c.kwargs["BLOCK_K"] <= max(16, next_power_of_2(k))
             and c.kwargs["BLOCK_M"] <= max(64, next_power_of_2(m))]
    if small or not fits:
        return small
    return [min(fits, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def config_key(c: triton.Config) -> tuple:
    """The config table entry of an autotune config."""
    key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
    schedule = "+".join(f for f, (name, value) in SCHEDULE_FEATURES.items() if c.kwargs.get(name) == value)
    return (*key, schedule) if schedule else key
