"""Every kernel x autotune config x dtype compiled ahead of time for every device family's targets, no GPU needed:
sm_80 (A100), sm_86 (RTX 30xx, A10), sm_90 (H100/H200), sm_100 (B200), sm_120 (RTX 50xx), gfx90a (MI210/MI250X),
gfx942 (MI300X), gfx950 (MI355X).

The compiles run once, in a subprocess without TRITON_INTERPRET (see aot_compile.py: every case of sm_80 and sm_90,
a representative set of the others unless AOT_TARGETS says otherwise); each test reads its target's cases and is
named after it (``[gfx942]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aot_compile
import aot_targets
import pytest
import torch
from fused_residual.kernels import fused_linear_configs as flc

from fused_residual import backends

pytestmark = pytest.mark.aot

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

TARGETS = list(aot_targets.TARGETS)
per_target = pytest.mark.parametrize("target", TARGETS)
ELEMENT = {"fp16": 2, "bf16": 2, "fp32": 4}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile.py")
    # AOT_TIMEOUT (seconds): the full sets (AOT_TARGETS=all ...) take longer than CI's share on a 2-core machine.
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=int(os.environ.get("AOT_TIMEOUT", "1800")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return data["results"], data["shared_limit"]


def _of(compiled, target):
    return [c for c in compiled[0] if c["target"] == target]


def _name(case):
    return f"{case['target']}-{case['dtype']}-{'x'.join(map(str, case['config']))}-{case['variant']}"


def _family(target):
    return aot_targets.family(target).name


def _every_case(target):
    return target in aot_targets.EVERY_CASE_IN_CI or os.environ.get("AOT_TARGETS") == "all" or \
        target in os.environ.get("AOT_TARGETS", "").split(",")


@per_target
def test_every_case_compiles(compiled, target):
    cases = _of(compiled, target)
    assert cases, "nothing compiled for this target"
    failed = [f"{_name(c)}: {c['error'][:400]}" for c in cases if not c["ok"]]
    assert not failed, "\n".join(failed)
    assert not [_name(c) for c in cases if not c["ptxas_ok"]], "ptxas rejected some kernels"


@per_target
def test_no_register_spills(compiled, target):
    spilling = [f"{_name(c)}: {c['spills']} {c['spill_unit']} spilled at {c['registers']} registers"
                for c in _of(compiled, target) if c["ok"] and c["spills"] != 0]
    assert not spilling, "\n".join(spilling)


@per_target
def test_shared_memory_fits_the_family(compiled, target):
    limit = compiled[1][target]
    assert limit == aot_targets.family(target).shared_memory
    too_big = [f"{_name(c)}: {c['shared']} > {limit}" for c in _of(compiled, target) if c["ok"] and c["shared"] > limit]
    assert not too_big, "\n".join(too_big)


@per_target
def test_every_kernel_uses_the_family_matrix_instruction(compiled, target):
    """Every kernel's dots compile to the family's matrix instruction (mma.sync, wgmma, tcgen05, v_mfma): fp16 and
    bf16 everywhere; fp32 too (TF32 on NVIDIA and gfx942, the fp32 MFMA elsewhere on AMD), except that tiles of fewer
    than 64 rows take mma.sync's TF32 on sm_90 (wgmma and tcgen05 take 64 rows and more)."""
    if not aot_targets.family(target).mma:
        pytest.skip("a GPU of no known family: no matrix instruction promised")

    def tensor_cores(c):
        return c["mma"] or (c["dtype"] == "fp32" and c["config"][0] < 64 and c["mma_sync"])

    slow = [_name(c) for c in _of(compiled, target) if c["ok"] and not tensor_cores(c)]
    assert not slow, f"kernels without {aot_targets.family(target).mma}:\n" + "\n".join(slow)


@per_target
def test_every_config_is_compiled(compiled, target):
    """The cases compiled are the target's cases (every one, or the representative set), and every fused-linear
    config the target's family may run is compiled in some case, per dtype class."""
    if os.environ.get("AOT_ONLY"):
        pytest.skip("AOT_ONLY compiles a subset")
    cases = _of(compiled, target)
    generated = [c for c in (*aot_compile.fused_linear_cases(), *aot_compile.whole_block_cases(),
                             *aot_compile.whole_net_cases()) if c["target"] == target]
    wanted = generated if _every_case(target) else aot_compile.representative(generated)
    assert {_name(c) for c in cases} == {_name(c) for c in wanted}
    configs = {(ELEMENT[c["dtype"]], tuple(c["config"])) for c in generated if c["kernel"] == "fused_linear"}
    assert {(ELEMENT[c["dtype"]], tuple(c["config"])) for c in cases if c["kernel"] == "fused_linear"} == configs
    kinds = {(c["kernel"], ELEMENT[c["dtype"]]) for c in generated}
    assert {(c["kernel"], ELEMENT[c["dtype"]]) for c in cases} >= kinds - {("whole_net_forward", 4)}


@pytest.mark.parametrize("target", aot_targets.EVERY_CASE_IN_CI)
def test_every_dtype_and_variant_is_covered(compiled, target):
    from fused_residual.kernels import whole_block_configs as wbc

    seen = {(c["kernel"], c["dtype"], c["variant"]) for c in _of(compiled, target)}
    family = _family(target)
    activation_variants = {name for name, *_ in aot_compile.activation_variants()}
    for dtype, size in ELEMENT.items():
        # autocast: 16-bit weights only; other activations: bf16 (standing for fp16) and fp32, their FFN launches
        # with an fp32 A in bf16 only; "_unmasked": only where the masked-A rule drops a tile
        for variant in {v for k, _, v in seen if k == "fused_linear" and "unmasked" not in v
                        and not v.startswith("schedule_")}:
            if aot_compile.sign_bits_source(variant) in activation_variants:
                wanted = dtype in aot_compile.ACTIVATION_DTYPES and (size == 2 or not variant.endswith("_ffn"))
            else:
                wanted = size == 2 or "autocast" not in variant
            assert (("fused_linear", dtype, variant) in seen) == wanted, (dtype, variant)
        for width in (16, 32, 64, 128):  # beyond the on-chip widths (whole backward), the next test
            forward = ("whole_block_forward", dtype, f"width{width}") in seen
            assert forward or width > wbc.WEIGHTS_ON_CHIP_WIDTH[size]
            backward = ("whole_block_backward", dtype, f"width{width}") in seen
            if width <= wbc.MAX_BACKWARD_WIDTH_WHOLE:
                assert backward == (width <= wbc.max_backward_width(family))
            net = ("whole_net_forward", dtype, f"in16-h{width}-out16") in seen
            assert net == (width != 32 and width <= wbc.WEIGHTS_ON_CHIP_WIDTH[size])


def test_every_activation_of_the_registry_is_compiled(compiled):
    """Each activation of the registry is compiled where a GEMM computes it (epilogue, gate, B's load where the
    backward keeps the pre-activation) and, if the backend gives it the whole-block kernels (register class
    "light"), in both of those."""
    from fused_residual.activations import ACTIVATIONS

    results, _ = compiled
    places = {(c["kernel"], key, c["flags"][key]) for c in results for key in ("ACTIVATION", "GATE", "B_ACTIVATION")
              if key in c["flags"]}
    for name, act in ACTIVATIONS.items():
        wanted = {("fused_linear", "ACTIVATION", name), ("fused_linear", "GATE", name)}
        wanted |= {("fused_linear", "B_ACTIVATION", name)} if not act.from_output else set()
        if act.register_class == "light":
            wanted |= {("whole_block_forward", "ACTIVATION", name), ("whole_block_backward", "ACTIVATION", name)}
        assert wanted <= places, (name, wanted - places)


@per_target
def test_whole_block_beyond_on_chip_widths_is_covered(compiled, target):
    """The streamed forward and the role-split backward: every config the code offers this family (within its
    shared memory) is compiled in some case (CI compiles a representative set: no config left out), and nothing is
    offered beyond the widths compiled here."""
    from fused_residual.kernels import whole_block_configs as wbc

    fam = aot_targets.family(target)
    compiled_configs = {(c["kernel"], c["dtype"] == "fp32", tuple(c["config"])) for c in _of(compiled, target)}
    for size in (2, 4):
        assert wbc.max_forward_width(size) <= max(aot_compile.WHOLE_BLOCK_WIDTHS)
        for width in aot_compile.WHOLE_BLOCK_WIDTHS:
            if width > wbc.WEIGHTS_ON_CHIP_WIDTH[size]:
                for c in wbc.runnable_forward_configs(width, size, size, fam.name, fam.shared_memory):
                    key = ("whole_block_forward", size == 4, (c.block_m, width, c.hidden_chunk, c.stages, c.warps))
                    assert key in compiled_configs or width < wbc.max_forward_width(size), key
            if wbc.MAX_BACKWARD_WIDTH_WHOLE < width <= wbc.max_backward_width(fam.name):
                for recompute in (False, True):
                    c = wbc.backward_config(width, size, False, fam.name, recompute)
                    key = ("whole_block_backward", size == 4, (c.block_m, width, c.hidden_chunk, 1, c.warps))
                    assert key in compiled_configs, key
    if target in aot_targets.EVERY_CASE_IN_CI:
        assert {(k, dtype, variant) for k, t, dtype, variant, _ in aot_compile.WHOLE_BLOCK_BEYOND_ON_CHIP
                if t == target} <= {(c["kernel"], c["dtype"], c["variant"]) for c in _of(compiled, target)}


@per_target
def test_whole_block_backward_cases_are_the_launched_configs(compiled, target):
    """Each whole-block backward case compiles the tile its launch takes (``backward_config`` for its width, dtype,
    fp32 x and recompute), not a neighbouring case's."""
    from fused_residual.kernels import whole_block_configs as wbc

    fam = _family(target)
    cases = [c for c in _of(compiled, target) if c["kernel"] == "whole_block_backward"]
    assert cases or wbc.max_backward_width(fam) == 0
    for c in cases:
        flags = c["flags"]
        want = wbc.backward_config(flags["WIDTH"], ELEMENT[c["dtype"]], bool(c["wide"]), fam,
                                   flags.get("RECOMPUTE", False))
        assert (flags["BLOCK_M"], c["config"][0], c["config"][4], flags["HIDDEN_CHUNK"]) == \
            (want.block_m, want.block_m, want.warps, want.hidden_chunk), _name(c)


def _prune_hook_allows(monkeypatch, target, dtype, flags, layout, wide=()):
    """The configs fused_linear's prune hook keeps on a device of ``target``'s family at a large problem, for a
    launch with ``flags`` whose operands have TMA_LAYOUT ``layout`` (``wide``: the fp32 ones)."""
    from fused_residual.kernels import _common, fused_linear
    from fused_residual.kernels import fused_linear_configs as fl

    monkeypatch.setattr(_common, "family", lambda device: aot_targets.family(target))
    tuner = fused_linear.fused_linear_autotuned
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    args = {name: torch.empty(0, dtype=torch.float32 if name in wide else torch_dtype)
            for name in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")}
    args.update({"M": 1 << 16, "N": 4096, "K": 4096, "K2": 4096 if flags.get("HAS_SECOND") else 0})
    flags = {"HAS_SECOND": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "MASK": "none", "GATE": "identity",
             "STORE_PRE": False, "ACTIVATION": "identity", "B_ACTIVATION": "identity", "HAS_ROWSUM": False,
             "SPLIT_K": 1, "SIGN_BITS": 0, "STORE_SIGNS": False, **flags, "TMA_LAYOUT": layout}
    return {fl.config_key(c) for c in tuner.early_config_prune(tuner.configs, args, **flags)}


@per_target
def test_compiled_configs_are_what_the_autotuner_may_run(compiled, target, monkeypatch):
    """Per dtype and variant, the configs compiled are those the autotuner's own prune hook keeps on a device of
    the target's family at a large problem, with the triton installed (none runs uncompiled), with the exceptions
    aot_compile.py states: "autocast_" variants are the fp32-operand launches only (the 16-bit ones are the plain
    variants); the other activations' variants leave out the small tiles, and one compiled with fp32 operands
    covers its 16-bit launch on the tiles both may run; an "_unmasked" twin has the tiles its masked launch may not
    run. Every case on sm_80 and sm_90; elsewhere (a representative set) the compiled ones are among those."""
    from fused_residual.kernels import fused_linear_configs as fl

    linear = [c for c in _of(compiled, target) if c["kernel"] == "fused_linear"
              and not c["variant"].startswith("schedule_")]  # the schedules: test_schedules_compile_as_intended
    activation_variants = {name for name, *_ in aot_compile.activation_variants()}
    for dtype, variant in sorted({(c["dtype"], c["variant"]) for c in linear}):
        cases = [c for c in linear if (c["dtype"], c["variant"]) == (dtype, variant)]
        flags, wide = cases[0]["flags"], {p for c in cases for p in c["wide"]}
        compiled_wide = {tuple(c["config"]) for c in cases if c["wide"]}
        compiled_plain = {tuple(c["config"]) for c in cases if not c["wide"]}
        expected_wide = _prune_hook_allows(monkeypatch, target, dtype, flags, "", wide) if wide else set()
        expected_plain = set() if variant.startswith("autocast") else \
            _prune_hook_allows(monkeypatch, target, dtype, flags, "") - expected_wide
        if variant.endswith("_unmasked"):
            masked = next(f for name, f, _ in aot_compile.FUSED_LINEAR_VARIANTS
                          if name == variant.removesuffix("_unmasked"))
            expected_plain -= _prune_hook_allows(monkeypatch, target, dtype, masked, "")
        if aot_compile.sign_bits_source(variant) in activation_variants:
            expected_wide = {c for c in expected_wide if c[0] * c[1] > fl.SMALL_TILE}
            expected_plain = {c for c in expected_plain if c[0] * c[1] > fl.SMALL_TILE}
        name = f"{target}-{dtype}-{variant}"
        if _every_case(target):
            assert (compiled_wide, compiled_plain) == (expected_wide, expected_plain), name
        else:
            assert compiled_wide <= expected_wide and compiled_plain <= expected_plain, name


@pytest.mark.parametrize("target", [t for t in TARGETS if aot_targets.family(t).name in flc.SCHEDULES])
def test_schedules_compile_as_intended(compiled, target, monkeypatch):
    """Each schedule of the family is compiled in the launches aot_compile.SCHEDULE_CASES names, each one the prune
    hook may give it; the code copies tiles with TMA exactly where the schedule says "tma", the tile loop is
    persistent exactly where it says "persistent", and the loop is warp-specialized where it says "ws" (no spills,
    shared memory and the matrix instruction: the tests above)."""
    from fused_residual.kernels import fused_linear_configs as fl

    cases = [c for c in _of(compiled, target) if c["kernel"] == "fused_linear" and c["variant"].startswith("schedule_")]
    assert {tuple(c["config"]) for c in cases} == set(fl.SCHEDULES[_family(target)]), "every schedule compiled"
    for c in cases:
        name = _name(c)
        features = fl.features(tuple(c["config"]))
        layout = aot_compile.TMA_LAYOUTS[c["layout"]]
        assert tuple(c["config"]) in _prune_hook_allows(monkeypatch, target, c["dtype"], c["flags"], layout), name
        if c["ok"]:
            assert (c["tma"], c["persistent"], c["warp_specialized"]) == (
                "tma" in features, "persistent" in features, "ws" in features), name


@per_target
def test_schedules_go_to_16bit_gemms_with_tma_operands_only(monkeypatch, target):
    """A family without schedules never receives one (AMD: the compile knobs only); where a family has them, no
    fp32, autocast or heavy-activation launch receives one, nor a "tma" schedule a launch whose operands do not
    qualify (TMA_LAYOUT ""), in any epilogue."""
    from fused_residual.kernels import fused_linear_configs as fl

    family = _family(target)
    scheduled = family in fl.SCHEDULES
    assert scheduled == (family in ("hopper", "blackwell"))

    def schedule(entry):
        return set(fl.features(entry)) - set(fl.AMD_OPTIONS)

    flag_sets = [dict(flags) for _, flags, _ in aot_compile.FUSED_LINEAR_VARIANTS + aot_compile.SCHEDULE_ONLY_VARIANTS]
    for flags in flag_sets:
        for dtype in ("fp16", "bf16", "fp32"):
            allowed = _prune_hook_allows(monkeypatch, target, dtype, flags, "kk")
            assert allowed, (dtype, flags)
            assert any(schedule(c) for c in allowed) == (scheduled and dtype != "fp32"), (dtype, flags)
            unaligned = _prune_hook_allows(monkeypatch, target, dtype, flags, "")
            assert not any("tma" in schedule(c) for c in unaligned), flags
        for wide, heavy in ((True, ()), (False, ("epilogue",))):
            table = fl.config_table(family, 2, wide=wide, heavy=heavy, tma=True, warp_specialize=True)
            assert not any(schedule(c) for c in table)


def test_hopper_pipelines_its_loads(compiled):
    """Multi-stage configs must really be software-pipelined on sm_90: their shared memory holds every stage."""
    for c in _of(compiled, "sm_90"):
        block_m, block_n, block_k, stages = c["config"][:4]
        if c["ok"] and c["kernel"] == "fused_linear" and stages > 1:
            assert c["shared"] >= (stages - 1) * (block_m + block_n) * block_k * ELEMENT[c["dtype"]], _name(c)


@per_target
def test_whole_block_shared_memory_bound_holds(compiled, target):
    """The dispatcher's shared-memory estimate for the whole-block forward bounds what the compiler allocates."""
    from fused_residual.kernels import whole_block_configs as wbc

    cases = [c for c in _of(compiled, target) if c["ok"] and c["kernel"] == "whole_block_forward"]
    assert bool(cases) == bool(wbc.forward_configs(16, 2, False, _family(target)))  # none for an unknown family
    for c in cases:
        flags, width = c["flags"], c["flags"]["WIDTH"]
        config = wbc.ForwardConfig(flags["BLOCK_M"], c["config"][4], flags["PROGRAMS_PER_SM"],
                                   flags["HIDDEN_CHUNK"], c["config"][3])
        x_element = 4 if "x_ptr" in c.get("wide", ()) else ELEMENT[c["dtype"]]
        bound = wbc.forward_shared_bytes(config, width, ELEMENT[c["dtype"]], x_element, _family(target))
        assert c["shared"] <= bound, f"{_name(c)}: {c['shared']} > estimated {bound}"


@per_target
def test_streamed_forward_pipelines_its_weight_chunks(compiled, target):
    """The streamed forward's chunks of both weights really are multi-buffered: its shared memory holds every stage
    (one fewer outside whole_block_configs.ALL_STAGES_BUFFERED, whose pipeliners keep stages - 1 in flight, and
    ALL_STAGES_BUFFERED_WIDE_X with an fp32 x)."""
    from fused_residual.kernels import whole_block_configs as wbc

    cases = [c for c in _of(compiled, target) if c["ok"] and c["kernel"] == "whole_block_forward"
             and c["flags"]["HIDDEN_CHUNK"]]
    for c in cases:
        _, width, chunk, stages, _ = c["config"]
        full = wbc.ALL_STAGES_BUFFERED_WIDE_X if c["wide"] else wbc.ALL_STAGES_BUFFERED
        buffers = stages if _family(target) in full else stages - 1
        assert c["shared"] >= buffers * 2 * width * chunk * ELEMENT[c["dtype"]], _name(c)
