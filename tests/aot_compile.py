"""Ahead-of-time compile of every kernel x autotune config x dtype for every device family's targets, with no GPU.

Run as a script (``python tests/aot_compile.py OUT.json``) in a process where TRITON_INTERPRET is unset, since
kernels decorated under the interpreter cannot be compiled. For each case it records whether it compiled, the
shared memory (LDS) it needs, its registers and spills and whether the family's matrix instruction is in the code
(``aot_targets.build``). ``tests/test_kernels_aot.py`` asserts on the result.

Targets (``aot_targets.TARGETS``): every case of sm_80 and sm_90; for the other targets CI compiles a representative
set (``representative``: each fused-linear config once per dtype class, each whole-block kernel on chip and beyond
at its widest, the whole-net kernel at its widest); ``AOT_TARGETS=all`` compiles every case of every target,
``AOT_TARGETS=sm_100,gfx942`` every case of those.

A case mirrors a real launch at a typical shape (sizes and strides multiples of 16): those arguments carry the
divisibility hint the runtime gives them, and unit strides are specialised to 1 as the runtime does.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import aot_targets
from aot_targets import TARGETS, family

from fused_residual.activations import ACTIVATIONS, REFERENCE_FORM

DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}

# Kernel variants: (name, flags, layout). Layouts say which operand strides are 1:
#   "x_wT":  A row-major (stride_ak = 1), B = W^T read through W's strides (stride_bk = 1)   forward layers
#   "g_W":   A row-major, B = W row-major (stride_bn = 1)                                      backward dh / dx
#   "gT_x":  A = g^T (stride_am = 1), B = x row-major (stride_bn = 1)                          weight gradients
FUSED_LINEAR_VARIANTS = [
    ("forward_bias_residual_relu", {"HAS_BIAS": True, "HAS_RESIDUAL": True, "ACTIVATION": "relu"}, "x_wT"),
    ("forward_projection", {"HAS_SECOND": True, "HAS_BIAS": True, "ACTIVATION": "relu"}, "x_wT"),
    ("backward_gate", {"MASK": "a", "GATE": "relu"}, "g_W"),
    ("backward_dx_projection", {"HAS_SECOND": True, "MASK": "a"}, "g_W"),
    ("backward_dx_residual", {"HAS_RESIDUAL": True, "MASK": "residual"}, "g_W"),
    ("weight_grad_split_k", {"HAS_ROWSUM": True, "SPLIT_K": 4, "MASK": "a"}, "gT_x"),
]
# Autocast: fp32 activations next to bf16 weights (the pointers named last are fp32). Each variant stands for the
# launches it is the superset of (every wide tensor and epilogue they have): linear1 (x); linear2 and the identity
# dx (an fp32 residual and output); the projection's forward and dx; dW1 and dWs (x as B). For fp16 and bf16
# (their conversions from fp32 compile differently: one spills where the other does not).
AUTOCAST_VARIANTS = [
    ("autocast_forward", {"HAS_BIAS": True, "ACTIVATION": "relu"}, "x_wT", ("a_ptr",)),
    ("autocast_residual", {"HAS_BIAS": True, "HAS_RESIDUAL": True, "MASK": "residual", "ACTIVATION": "relu"}, "x_wT",
     ("res_ptr", "c_ptr")),
    ("autocast_projection", {"HAS_SECOND": True, "HAS_BIAS": True, "MASK": "a", "ACTIVATION": "relu"}, "x_wT",
     ("sa_ptr", "c_ptr")),
    ("autocast_weight_grad", {"HAS_ROWSUM": True, "SPLIT_K": 4, "MASK": "a"}, "gT_x", ("b_ptr",)),
]
AUTOCAST_DTYPES = ("fp16", "bf16")
# Every other activation of the registry (the variants above are the reference block's, ReLU hidden), each in the
# launches that compute it: linear1's epilogue (with the pre-activation stored where the backward keeps it: the
# registry's from_output), g1's gate and, where the saved tensor is the pre-activation, dW2's act on B's load. Gate
# and dW2 as the launches that run: masked A (a final ReLU) with 16-bit A, and unmasked with an fp32 A (the FFN form
# under autocast: fp32 dout), which stands for the unmasked 16-bit one too; linear1 with an fp32 A (autocast's x),
# standing for the 16-bit one too. In bf16 and fp32: fp16 compiles like bf16 except for the fp32 -> 16-bit
# conversions, which the autocast variants above compile in both. The tiles each may take follow its register class
# (fused_linear_configs.heavy_places). Tiles of at most 2048 elements (64 x 32 and smaller: <= 16 fp32 accumulators
# per thread, under 100 registers in every activation variant compiled while these tables were made) are left out,
# to keep CI's compile time down (see the README for the measured time). Read from the registry when the cases are
# made (an activation registered later is taken up too).
ACTIVATION_DTYPES = ("bf16", "fp32")


def activation_variants() -> list[tuple]:
    """(name, flags, layout, wide pointers) of every activation variant."""
    return [v for act in ACTIVATIONS if act != REFERENCE_FORM.activation for v in _activation_variants(act)]


def _activation_variants(act: str):
    keeps_pre = not ACTIVATIONS[act].from_output
    yield (f"forward_{act}", {"HAS_BIAS": True, "ACTIVATION": act, **({"STORE_PRE": True} if keeps_pre else {})},
           "x_wT", ("a_ptr",))
    yield (f"backward_gate_{act}", {"MASK": "a", "GATE": act}, "g_W", ())
    yield (f"backward_gate_{act}_ffn", {"GATE": act}, "g_W", ("a_ptr",))
    if keeps_pre:
        yield (f"weight_grad_{act}_on_b", {"HAS_ROWSUM": True, "SPLIT_K": 4, "MASK": "a", "B_ACTIVATION": act}, "gT_x",
               ())
        yield (f"weight_grad_{act}_on_b_ffn", {"HAS_ROWSUM": True, "SPLIT_K": 4, "B_ACTIVATION": act}, "gT_x",
               ("a_ptr",))


def sign_bit_twins(variants: list[tuple]) -> list[tuple]:
    """The launches a recompute block makes in place of ``variants`` ((name, flags, layout, *rest)), each as
    (name, flags, layout, *rest, bits pointers): a mask on A or on the residual read from packed sign bits
    ("_bits": Y's rows on m, or on k for a weight gradient), and a forward with a residual or shortcut whose final
    ReLU's bits are written ("_signs", without the mask of the superset variants)."""
    twins = []
    for name, flags, layout, *rest in variants:
        if flags.get("MASK", "none") != "none":
            bits = {**flags, "SIGN_BITS": 2 if layout == "gT_x" else 1}
            twins.append((f"{name}_bits", bits, layout, *rest, ("mask_ptr",)))
        forward = flags.get("HAS_RESIDUAL") or flags.get("HAS_SECOND")
        if flags.get("ACTIVATION") == "relu" and forward and not flags.get("STORE_PRE"):
            signs = {k: v for k, v in flags.items() if k != "MASK"} | {"STORE_SIGNS": True}
            twins.append((f"{name}_signs", signs, layout, *rest, ("pre_ptr",)))
    return twins


def sign_bits_source(variant: str) -> str:
    """The variant a "_bits" or "_signs" twin was made from (the variant itself otherwise)."""
    return variant.removesuffix("_bits").removesuffix("_signs")


SMALL_TILE = 64 * 32
# Schedules (fused_linear_configs.SCHEDULES: TMA, persistent, warp-specialized; fp16/bf16 only): each in a
# representative set of the launches the autotuner may give it, in bf16 (fp16 compiles the same code but for the
# element type), not the whole cross product, to keep CI's compile time down. The set covers each schedule feature
# in each operand layout (A row-major or g^T, B = W^T or row-major) and each epilogue kind: tile epilogues (split or
# not), the second operand pair, the masks, split-K with row sums. AOT_SCHEDULES=all compiles every (variant,
# schedule) pair the prune hook allows instead (done with triton 3.6 and 3.9 when the schedules were added; see
# docs/verification.md). Variants only the warp-specialized schedule adds (the launches it may take that no variant
# above stands for):
SCHEDULE_ONLY_VARIANTS = [
    ("forward_bias_relu", {"HAS_BIAS": True, "ACTIVATION": "relu"}, "x_wT"),
    ("backward_dh", {"MASK": "a"}, "g_W"),
]
# (schedule features, variant): each schedule is compiled in the variants listed for its features.
SCHEDULE_CASES = [
    ("tma+persistent+split", "forward_bias_residual_relu"),
    ("tma+persistent+split", "backward_dx_residual"),
    ("tma+persistent+split", "weight_grad_split_k"),
    ("tma+persistent+split", "backward_gate_unmasked"),
    ("tma+persistent", "backward_gate"),
    ("tma+persistent", "backward_dx_projection"),
    ("tma", "forward_projection"),
    ("tma", "weight_grad_split_k"),
    ("tma+persistent+ws", "forward_bias_relu"),
    ("tma+persistent+ws", "backward_dh"),
]
SCHEDULE_DTYPE = "bf16"
# _tma.tma_layout() of each layout's operands (at aligned sizes): A's contiguous dim, then B's.
TMA_LAYOUTS = {"x_wT": "kk", "g_W": "kn", "gT_x": "mn"}
UNIT_STRIDES = {
    "x_wT": ("stride_ak", "stride_bk", "stride_sak", "stride_sbk", "stride_rn", "stride_qk", "stride_gn",
             "stride_pn", "stride_cn"),
    "g_W": ("stride_ak", "stride_bn", "stride_sak", "stride_sbn", "stride_rn", "stride_qk", "stride_gn", "stride_pn",
            "stride_cn"),
    "gT_x": ("stride_am", "stride_bn", "stride_sam", "stride_sbn", "stride_rn", "stride_qm", "stride_gn", "stride_pn",
             "stride_cn"),
}


def _table(fl, target: str, size: int, flags: dict, wide: bool, tma: bool = False) -> list:
    """The configs the autotuner may run for a launch with ``flags`` (fused_linear_configs.prune's rule); ``tma``: with
    operands that qualify for TMA (the Hopper schedules; without, only those that need no TMA)."""
    tile_epilogue = flags.get("HAS_RESIDUAL", False) or "GATE" in flags
    heavy = fl.heavy_places(flags.get("ACTIVATION", "identity"), flags.get("GATE", "identity"),
                            flags.get("B_ACTIVATION", "identity"))
    warp_specialize = not (flags.get("HAS_SECOND") or flags.get("HAS_ROWSUM") or flags.get("SPLIT_K", 1) > 1)
    return fl.config_table(family(target).name, size, tile_epilogue, flags.get("MASK") == "a", wide, heavy, tma,
                           warp_specialize, flags.get("SIGN_BITS", 0), flags.get("STORE_SIGNS", False))


def fused_linear_cases():
    from fused_residual.kernels import fused_linear_configs as fl

    def case(name, flags, layout, target, dtype, config, wide=(), bits=()):
        return {"kernel": "fused_linear", "variant": name, "layout": layout, "flags": flags, "target": target,
                "dtype": dtype, "config": list(config), "wide": list(wide), "bits": list(bits)}

    for target in TARGETS:
        for dtype, size in DTYPES.items():
            for name, flags, layout, bits in sign_bit_twins(FUSED_LINEAR_VARIANTS):
                for config in _table(fl, target, size, flags, False):
                    yield case(name, flags, layout, target, dtype, config, bits=bits)
            for name, flags, layout, wide, bits in sign_bit_twins(AUTOCAST_VARIANTS):
                if dtype in AUTOCAST_DTYPES:
                    for config in _table(fl, target, size, flags, True):
                        yield case(name, flags, layout, target, dtype, config, wide, bits)
            for name, flags, layout, wide, bits in sign_bit_twins(activation_variants()):
                if dtype not in ACTIVATION_DTYPES or (size == 4 and name.removesuffix("_bits").endswith("_ffn")):
                    continue
                wide = wide if size == 2 else ()
                wide_configs = _table(fl, target, size, flags, True) if wide else []
                for config in _table(fl, target, size, flags, False):
                    if config[0] * config[1] > fl.SMALL_TILE:
                        yield case(name, flags, layout, target, dtype, config, wide if config in wide_configs else (),
                                   bits)
            for name, flags, layout in FUSED_LINEAR_VARIANTS:
                for config in _table(fl, target, size, flags, False):
                    yield case(name, flags, layout, target, dtype, config)
                # Without the mask on A (the FFN form; dW1) the tiles the mask rule drops may run too.
                if flags.get("MASK") == "a":
                    plain = {k: v for k, v in flags.items() if k != "MASK"}
                    for config in _table(fl, target, size, plain, False):
                        if config not in _table(fl, target, size, flags, False):
                            yield case(f"{name}_unmasked", plain, layout, target, dtype, config)
            for name, flags, layout, wide in AUTOCAST_VARIANTS:
                if dtype in AUTOCAST_DTYPES:
                    for config in _table(fl, target, size, flags, True):
                        yield case(name, flags, layout, target, dtype, config, wide)
            for name, flags, layout, wide in activation_variants():
                if dtype not in ACTIVATION_DTYPES or (size == 4 and name.endswith("_ffn")):
                    continue  # fp32: no autocast, and the masked launch stands for the unmasked one
                wide = wide if size == 2 else ()
                wide_configs = _table(fl, target, size, flags, True) if wide else []
                for config in _table(fl, target, size, flags, False):
                    if config[0] * config[1] > fl.SMALL_TILE:
                        yield case(name, flags, layout, target, dtype, config, wide if config in wide_configs else ())
    yield from schedule_cases(case)


def schedule_cases(case):
    """The schedules' cases (``fused_linear_configs.SCHEDULES``), variants named "schedule_<variant>": each schedule
    of each target's family in the launches SCHEDULE_CASES names for its features (where the prune hook gives it
    that launch), or with AOT_SCHEDULES=all every (launch, schedule) pair the prune hook allows, in fp16 and bf16."""
    from fused_residual.kernels import fused_linear_configs as fl

    variants = {name: (flags, layout) for name, flags, layout in FUSED_LINEAR_VARIANTS + SCHEDULE_ONLY_VARIANTS}
    # Without the mask on A (the FFN form's g1, dW1) a launch may take what the mask rule drops, as above.
    variants.update({f"{name}_unmasked": ({k: v for k, v in flags.items() if k != "MASK"}, layout)
                     for name, (flags, layout) in list(variants.items()) if flags.get("MASK") == "a"})
    every = os.environ.get("AOT_SCHEDULES") == "all"
    for target in TARGETS:
        schedules = fl.SCHEDULES.get(family(target).name, [])
        if every and schedules:
            for dtype in ("fp16", "bf16"):
                for name, (flags, layout) in variants.items():
                    masked = variants[name.removesuffix("_unmasked")][0]
                    for config in _table(fl, target, 2, flags, False, tma=True):
                        if config in schedules and (masked is flags or config not in _table(
                                fl, target, 2, masked, False, tma=True)):
                            yield case(f"schedule_{name}", flags, layout, target, dtype, config)
            continue
        for entry in schedules:
            for features, name in SCHEDULE_CASES:
                flags, layout = variants[name]
                if features == entry[5] and entry in _table(fl, target, 2, flags, False, tma=True):
                    yield case(f"schedule_{name}", flags, layout, target, SCHEDULE_DTYPE, entry)


# Whole-block configs read [BLOCK_M, WIDTH, HIDDEN_CHUNK (WIDTH when 0), num_stages, num_warps]. The whole block
# beyond the widths whose weights it keeps on chip (the forward streaming its weights, the backward split by role)
# compiles in 1-5 s per case: on sm_80 and sm_90 CI compiles this representative set, every such config on each
# of them and each variant kind once, keyed (kernel, target, dtype, variant, BLOCK_M) (the other targets: the
# representative set of ``representative``); AOT_WHOLE_BLOCK=all compiles every case (done with triton 3.6 and 3.9
# when they were added; see docs/verification.md).
WHOLE_BLOCK_BEYOND_ON_CHIP = {
    ("whole_block_forward", "sm_90", "bf16", "width256", 64),
    ("whole_block_forward", "sm_90", "bf16", "width256", 128),
    ("whole_block_forward", "sm_90", "bf16", "width256-wide_x", 64),
    ("whole_block_forward", "sm_90", "fp16", "width256-no_final_relu", 128),
    ("whole_block_forward", "sm_80", "fp16", "width256", 64),
    ("whole_block_forward", "sm_90", "fp32", "width256", 64),
    ("whole_block_forward", "sm_80", "fp32", "width256", 64),
    ("whole_block_backward", "sm_90", "bf16", "width128", 64),
    ("whole_block_backward", "sm_90", "fp16", "width128-wide_x", 64),
    ("whole_block_backward", "sm_90", "fp32", "width128", 32),
    # A recompute block's: the forward writing the sign bits, the backward computing h on chip and reading them.
    ("whole_block_forward", "sm_90", "bf16", "width256-signs", 64),
    ("whole_block_forward", "sm_90", "bf16", "width256-signs", 128),
    ("whole_block_forward", "sm_90", "bf16", "width256-wide_x-signs", 64),
    ("whole_block_forward", "sm_80", "fp16", "width256-signs", 64),
    ("whole_block_forward", "sm_90", "fp32", "width256-signs", 64),
    ("whole_block_forward", "sm_80", "fp32", "width256-signs", 64),
    ("whole_block_backward", "sm_90", "bf16", "width128-recompute", 32),
    ("whole_block_backward", "sm_90", "fp16", "width128-wide_x-recompute", 32),
    ("whole_block_backward", "sm_90", "fp16", "width128-no_final_relu-recompute", 32),
    ("whole_block_backward", "sm_90", "fp32", "width128-recompute", 32),
}
WHOLE_BLOCK_WIDTHS = (16, 32, 64, 128, 256)


def whole_block_cases():
    """For each hidden activation the backend gives the whole-block kernels: the registry's "light" ones. Variants
    of any but the reference block's are named "...-<activation>" (beyond the on-chip widths: AOT_WHOLE_BLOCK=all)."""
    for activation in [name for name, act in ACTIVATIONS.items() if act.register_class == "light"]:
        yield from _whole_block_cases(activation)


def _whole_block_cases(activation: str):
    """Every width and config; autocast (fp32 x, and dx in backward) in forward from width 64 (width 16 and 32's
    configs, as light or lighter, are left out) and in backward at every width; without the final ReLU (the FFN
    form: fewer operations than with it) at the widest width of each kind (weights on chip or not; whole or split
    backward), in one config. Beyond the on-chip widths, WHOLE_BLOCK_BEYOND_ON_CHIP only, unless AOT_WHOLE_BLOCK=all."""
    from fused_residual.kernels import whole_block_configs as wb

    named = "" if activation == REFERENCE_FORM.activation else f"-{activation}"
    from_output = ACTIVATIONS[activation].from_output

    every = os.environ.get("AOT_WHOLE_BLOCK") == "all"

    def wanted(case, beyond):
        key = (case["kernel"], case["target"], case["dtype"], case["variant"], case["config"][0])
        return (not beyond or every or key in WHOLE_BLOCK_BEYOND_ON_CHIP
                or case["target"] not in aot_targets.EVERY_CASE_IN_CI)

    for target in TARGETS:
        fam = family(target)
        for dtype, size in DTYPES.items():
            on_chip = wb.WEIGHTS_ON_CHIP_WIDTH[size]
            backward_widest = wb.max_backward_width(fam.name)
            for width in WHOLE_BLOCK_WIDTHS:
                beyond = width > on_chip
                widest = width in (on_chip, wb.max_forward_width(size))
                wides = [()] + ([("x_ptr",)] if dtype in AUTOCAST_DTYPES and width >= 64 else [])
                for wide in wides:
                    configs = wb.runnable_forward_configs(width, size, 4 if wide else size, fam.name,
                                                          fam.shared_memory)
                    runs = [(c, True) for c in configs] + ([(configs[-1], False)] if widest and configs and not wide
                                                           else [])
                    for config, final_relu in runs:
                        suffix = ("-wide_x" if wide else "") + ("" if final_relu else "-no_final_relu") + named
                        case = {"kernel": "whole_block_forward", "variant": f"width{width}{suffix}", "target": target,
                                "dtype": dtype, "config": [config.block_m, width, config.hidden_chunk or width,
                                                           config.stages, config.warps],
                                "wide": list(wide),
                                "flags": {"HAS_B1": True, "HAS_B2": True, "STORE_SAVED": True, "ACTIVATION": activation,
                                          "FROM_OUTPUT": from_output, "FINAL_RELU": final_relu, "WIDTH": width,
                                          "BLOCK_M": config.block_m, "PROGRAMS_PER_SM": config.programs_per_sm,
                                          "HIDDEN_CHUNK": config.hidden_chunk}}
                        if wanted(case, beyond):
                            yield case
                        if final_relu:  # a recompute block's forward: the sign bits instead of the saved tensor
                            flags = {**case["flags"], "STORE_SAVED": False, "STORE_SIGNS": True}
                            variant = case["variant"].removesuffix(named) + "-signs" + named
                            twin = {**case, "variant": variant, "flags": flags, "bits": ["saved_ptr"]}
                            if wanted(twin, beyond):
                                yield twin
                if width <= backward_widest:
                    beyond = width > wb.MAX_BACKWARD_WIDTH_WHOLE
                    widest = width in (backward_widest, min(backward_widest, wb.MAX_BACKWARD_WIDTH_WHOLE))
                    wides = [()] + ([("x_ptr", "dx_ptr")] if dtype in AUTOCAST_DTYPES else [])
                    for wide in wides:
                        block_m, warps, chunk = wb.backward_config(width, size, bool(wide), fam.name)
                        for final_relu in (True, False) if widest and not wide else (True,):
                            suffix = ("-wide_x" if wide else "") + ("" if final_relu else "-no_final_relu") + named
                            case = {"kernel": "whole_block_backward", "variant": f"width{width}{suffix}",
                                    "target": target,
                                    "dtype": dtype, "config": [block_m, width, chunk or width, 1, warps],
                                    "wide": list(wide),
                                    "flags": {"NEED_DX": True, "NEED_WEIGHTS": True, "ACTIVATION": activation,
                                              "FROM_OUTPUT": from_output, "FINAL_RELU": final_relu, "WIDTH": width,
                                              "BLOCK_M": block_m, "HIDDEN_CHUNK": chunk,
                                              "DX_SHARE": wb.dx_share(width, chunk) if chunk else 1}}
                            if wanted(case, beyond):
                                yield case
                            # A recompute block's backward: h on chip from x and W1, the final ReLU's sign bits.
                            # (Names of its own: the loop's next case takes the plain backward's config.)
                            r_rows, r_warps, r_chunk = wb.backward_config(width, size, bool(wide), fam.name, True)
                            flags = {**case["flags"], "SIGN_BITS": final_relu, "RECOMPUTE": True, "HAS_B1": True,
                                     "BLOCK_M": r_rows, "HIDDEN_CHUNK": r_chunk,
                                     "DX_SHARE": wb.dx_share(width, r_chunk) if r_chunk else 1}
                            variant = case["variant"].removesuffix(named) + "-recompute" + named
                            config = [r_rows, width, r_chunk or width, 1, r_warps]
                            twin = {**case, "variant": variant, "flags": flags, "config": config,
                                    "bits": ["out_ptr"] if final_relu else []}
                            if wanted(twin, beyond):
                                yield twin


def whole_net_cases():
    from fused_residual.kernels import whole_block_configs as wb
    from fused_residual.kernels import whole_net as wn

    for target in TARGETS:
        if family(target).name not in wn.NET_FAMILIES:
            continue
        for dtype, size in DTYPES.items():
            for hidden in (16, 64, 128):
                if hidden > wb.WEIGHTS_ON_CHIP_WIDTH[size]:
                    continue
                for in_width, out_width in sorted({(16, 16), (hidden, hidden)}):
                    for block_m, warps in wn.configs(hidden):
                        yield {"kernel": "whole_net_forward", "variant": f"in{in_width}-h{hidden}-out{out_width}",
                               "target": target, "dtype": dtype, "config": [block_m, hidden, hidden, 1, warps],
                               "flags": {"IN_WIDTH": in_width, "H_WIDTH": hidden, "OUT_WIDTH": out_width,
                                         "BLOCK_M": block_m}}


def _compile(case: dict) -> dict:
    if case["kernel"] == "whole_net_forward":
        return _compile_whole_net(case)
    if case["kernel"] != "fused_linear":
        return _compile_whole_block(case)

    from fused_residual.kernels import fused_linear_configs as fl
    from fused_residual.kernels.fused_linear_kernel import fused_linear_kernel

    kernel = fused_linear_kernel
    names = list(kernel.arg_names)
    block_m, block_n, block_k = case["config"][:3]
    flags = {"HAS_SECOND": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "MASK": "none", "GATE": "identity",
             "STORE_PRE": False, "ACTIVATION": "identity", "B_ACTIVATION": "identity", "HAS_ROWSUM": False,
             "SPLIT_K": 1, "SIGN_BITS": 0, "STORE_SIGNS": False, **case["flags"]}
    # TMA_LAYOUT as the wrapper computes it for these unit strides (families with TMA, A and B of one dtype, no sign
    # bits to read; "" elsewhere).
    tma = family(case["target"]).tma and not {"a_ptr", "b_ptr"} & set(case["wide"]) and not flags["SIGN_BITS"]
    layout = TMA_LAYOUTS[case["layout"]] if tma else ""
    schedule = fl.schedule_constexprs(tuple(case["config"]))
    options = {name: schedule.pop(name) for name, _ in fl.AMD_OPTIONS.values() if name in schedule}
    constexprs = {**flags, "INPUT_PRECISION": _precision(case),
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "TMA_LAYOUT": layout,
                  "TMA": False, "PERSISTENT": False, "WARP_SPECIALIZE": False, "EPILOGUE_SPLIT": 1, **schedule}
    # Packed sign bits have a row stride of their own (stride_qm, stride_pm) and no feature stride.
    bits_strides = ("stride_qm", "stride_qk") if flags["SIGN_BITS"] else ()
    constexprs.update({s: 1 for s in UNIT_STRIDES[case["layout"]] if s not in bits_strides})
    fp32_args = ("ws_ptr",)
    return _build(case, kernel, names, constexprs, lambda arg: "*i32" if arg == "counters_ptr"
                  else "*fp32" if arg in fp32_args else f"*{case['dtype']}", options)


def _precision(case: dict) -> str:
    """``_common.input_precision`` on the case's family: TF32 for fp32 where the family takes it."""
    return "tf32" if case["dtype"] == "fp32" and family(case["target"]).tf32 else "ieee"


def _compile_whole_block(case: dict) -> dict:
    """The whole-block kernels at a typical launch: row-major tensors (unit feature strides)."""
    from fused_residual.kernels.whole_block_backward import whole_block_backward_kernel
    from fused_residual.kernels.whole_block_forward import whole_block_forward_kernel

    forward = case["kernel"] == "whole_block_forward"
    kernel = whole_block_forward_kernel if forward else whole_block_backward_kernel
    names = list(kernel.arg_names)
    defaults = {"STORE_SIGNS": False} if forward else {"SIGN_BITS": False, "RECOMPUTE": False, "HAS_B1": False}
    constexprs = {**defaults, **case["flags"], "INPUT_PRECISION": _precision(case)}
    constexprs.update({n: 1 for n in names if n.startswith("stride") and n.endswith(("f", "k"))})
    return _build(case, kernel, names, constexprs, lambda arg: "*i32" if arg == "counters_ptr"
                  else "*fp32" if arg == "ws_ptr" else f"*{case['dtype']}")


def _compile_whole_net(case: dict) -> dict:
    """The whole-net kernel with row-major activations and weights."""
    from fused_residual.kernels import whole_net as wn

    kernel = wn.whole_net_forward_kernel
    names = list(kernel.arg_names)
    constexprs = {**case["flags"], "INPUT_PRECISION": _precision(case),
                  "stride_xk": 1, "stride_win_k": 1, "stride_wout_k": 1, "stride_yn": 1}
    return _build(case, kernel, names, constexprs, lambda arg: f"*{case['dtype']}")


def _build(case: dict, kernel, names: list[str], constexprs: dict, pointer_type, options: dict | None = None) -> dict:
    """Compile ``case`` for its target; its pointers have ``pointer_type(name)``, except those named in
    ``case["wide"]``: fp32 activations next to fp16/bf16 weights (autocast), and in ``case["bits"]``: packed sign
    bits. ``options``: compile options beside the config's stages and warps (the AMD knobs)."""
    wide, bits = case.get("wide", ()), case.get("bits", ())
    base_type = pointer_type
    pointer_type = lambda arg: "*fp32" if arg in wide else "*u8" if arg in bits else base_type(arg)  # noqa: E731
    signature, attrs = {}, {}
    for i, arg in enumerate(names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointer_type(arg)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg.startswith("stride") or arg in ("M", "N", "K", "K2", "F", "IN", "H", "OUT"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    stages, warps = case["config"][3:5]
    return {**case, **aot_targets.build(case["target"], kernel, signature, constexprs, attrs,
                                        {"num_warps": warps, "num_stages": stages, **(options or {})})}


def representative(cases: list[dict]) -> list[dict]:
    """A representative set of one target's cases, for CI: each fused-linear config once per dtype class (16-bit in
    bf16), the variants taken in turn; each whole-block kernel per dtype class on chip and beyond (streamed forward,
    role-split backward; the recompute backward apart), at its widest width in its largest config; the whole-net
    kernel at its widest."""
    order = {"bf16": 0, "fp16": 1, "fp32": 2}
    groups: dict[tuple, list[dict]] = {}
    for c in sorted(cases, key=lambda c: order[c["dtype"]]):  # stable: generation order within a dtype
        fp32 = c["dtype"] == "fp32"
        if c["kernel"] == "fused_linear":
            key = (c["kernel"], fp32, str(c["config"]))
        elif c["kernel"] == "whole_net_forward":
            key = (c["kernel"], False, "")
        else:  # [BLOCK_M, WIDTH, HIDDEN_CHUNK or WIDTH, stages, warps]: chunked beyond the on-chip widths; a
            # recompute backward has configs of its own
            key = (c["kernel"], fp32, str(c["config"][2] != c["config"][1]), str(c["flags"].get("RECOMPUTE", False)))
        groups.setdefault(key, []).append(c)
    chosen = []
    for i, key in enumerate(sorted(groups)):
        group = groups[key]
        if key[0] == "fused_linear":
            variants = sorted({c["variant"] for c in group})
            chosen.append(next(c for c in group if c["variant"] == variants[i % len(variants)]))
        else:
            chosen.append(max(group, key=lambda c: (c["config"][1], c["config"][0], c["config"][4])))
    return chosen


def selected(cases: list[dict]) -> list[dict]:
    """The cases to compile (module docstring): every case of EVERY_CASE_IN_CI and of the targets AOT_TARGETS
    names ("all": every target), a representative set of the others."""
    named = os.environ.get("AOT_TARGETS", "")
    every = set(TARGETS) if named == "all" else set(aot_targets.EVERY_CASE_IN_CI) | set(filter(None, named.split(",")))
    chosen = [c for c in cases if c["target"] in every]
    for target in TARGETS:
        if target not in every:
            chosen += representative([c for c in cases if c["target"] == target])
    return chosen


def main(out_path: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot_compile.py must run without TRITON_INTERPRET")
    only = os.environ.get("AOT_ONLY", "")  # substring filter on "target-dtype-config-variant", for development
    cases = [c for c in selected([*fused_linear_cases(), *whole_block_cases(), *whole_net_cases()])
             if only in f"{c['target']}-{c['dtype']}-{c['config']}-{c['variant']}"]
    workers = int(os.environ.get("AOT_WORKERS", "0")) or max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_compile, cases, chunksize=4))
    limits = {target: family(target).shared_memory for target in TARGETS}
    with open(out_path, "w") as f:
        json.dump({"shared_limit": limits, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
