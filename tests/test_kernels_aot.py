"""Every kernel x autotune config x dtype compiled ahead of time for sm_90 (H100) and sm_80 (A100), no GPU needed.

The compiles run once, in a subprocess without TRITON_INTERPRET (see aot_compile.py); each test reads its cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aot_compile
import pytest
import torch

from fused_residual import backends

pytestmark = pytest.mark.aot

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return data["results"], {int(k): v for k, v in data["arch_shared_limit"].items()}


def _name(case):
    return f"sm{case['cap']}-{case['dtype']}-{'x'.join(map(str, case['config']))}-{case['variant']}"


def test_every_case_compiles(compiled):
    results, _ = compiled
    failed = [f"{_name(c)}: {c['error'][:400]}" for c in results if not c["ok"]]
    assert not failed, "\n".join(failed)
    assert not [_name(c) for c in results if not c["ptxas_ok"]], "ptxas rejected some kernels"


def test_every_arch_dtype_and_variant_is_covered(compiled):
    from fused_residual.kernels import whole_block_configs as wbc

    results, limits = compiled
    assert set(limits) == {90, 80}
    seen = {(c["kernel"], c["cap"], c["dtype"], c["variant"]) for c in results}
    for cap in limits:
        for dtype, size in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
            # autocast: 16-bit weights only; other activations: bf16 (standing for fp16) and fp32, their FFN
            # launches with an fp32 A in bf16 only; "_unmasked": only where the masked-A rule drops a tile
            activation_variants = {name for name, *_ in aot_compile.activation_variants()}
            for variant in {v for k, _, _, v in seen if k == "fused_linear" and "unmasked" not in v
                            and not v.startswith("hopper_")}:
                if aot_compile.sign_bits_source(variant) in activation_variants:
                    wanted = dtype in aot_compile.ACTIVATION_DTYPES and (size == 2 or not variant.endswith("_ffn"))
                else:
                    wanted = size == 2 or "autocast" not in variant
                assert (("fused_linear", cap, dtype, variant) in seen) == wanted, (cap, dtype, variant)
            for width in (16, 32, 64, 128):  # beyond the on-chip widths (whole backward), the next test
                forward = ("whole_block_forward", cap, dtype, f"width{width}") in seen
                assert forward or width > wbc.WEIGHTS_ON_CHIP_WIDTH[size]
                backward = ("whole_block_backward", cap, dtype, f"width{width}") in seen
                if width <= wbc.MAX_BACKWARD_WIDTH_WHOLE:
                    assert backward == (width <= wbc.max_backward_width((cap // 10, 0)))
                net = ("whole_net_forward", cap, dtype, f"in16-h{width}-out16") in seen
                assert net == (width != 32 and width <= wbc.WEIGHTS_ON_CHIP_WIDTH[size])
    hopper = {(cap, dtype) for k, cap, dtype, v in seen if v.startswith("hopper_")}
    assert (90, aot_compile.HOPPER_DTYPE) in hopper and hopper <= {(90, "fp16"), (90, "bf16")}, hopper


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


def test_whole_block_beyond_on_chip_widths_is_covered(compiled):
    """The streamed forward and the role-split backward: every config the code offers, on every architecture it
    offers it on, is compiled in some case (CI compiles aot_compile.WHOLE_BLOCK_BEYOND_ON_CHIP, a representative
    set: no (architecture, config) pair left out), and nothing is offered beyond the widths compiled here."""
    from fused_residual.kernels import whole_block_configs as wbc

    results, limits = compiled
    compiled_configs = {(c["kernel"], c["cap"], c["dtype"] == "fp32", tuple(c["config"])) for c in results}
    for cap in limits:
        capability = (cap // 10, cap % 10)
        for size in (2, 4):
            dtype_is_fp32 = size == 4
            assert wbc.max_forward_width(size) <= max(aot_compile.WHOLE_BLOCK_WIDTHS)
            for width in aot_compile.WHOLE_BLOCK_WIDTHS:
                if width > wbc.WEIGHTS_ON_CHIP_WIDTH[size]:
                    for c in wbc.forward_configs(width, size, False, capability):
                        key = ("whole_block_forward", cap, dtype_is_fp32, (c.block_m, width, c.hidden_chunk,
                                                                            c.stages, c.warps))
                        assert key in compiled_configs or width < wbc.max_forward_width(size), key
                if wbc.MAX_BACKWARD_WIDTH_WHOLE < width <= wbc.max_backward_width(capability):
                    for recompute in (False, True):
                        c = wbc.backward_config(width, size, recompute=recompute)
                        key = ("whole_block_backward", cap, dtype_is_fp32, (c.block_m, width, c.hidden_chunk, 1,
                                                                                 c.warps))
                        assert key in compiled_configs, key
    assert {(k, cap, dtype, variant) for k, cap, dtype, variant, _ in aot_compile.WHOLE_BLOCK_BEYOND_ON_CHIP} <= {
        (c["kernel"], c["cap"], c["dtype"], c["variant"]) for c in results}


def test_compiled_configs_are_what_the_autotuner_may_run(compiled, monkeypatch):
    """Per architecture, dtype and variant, the configs compiled here are exactly those the autotuner's own prune
    hook keeps on such a device at a large problem, with the triton installed (none runs uncompiled), with the
    exceptions aot_compile.py states: "autocast_" variants are the fp32-operand launches only (the 16-bit ones are
    the plain variants); the other activations' variants leave out the small tiles, and one compiled with fp32 operands
    covers its 16-bit launch on the tiles both may run; an "_unmasked" twin has the tiles its masked launch may not
    run."""
    from fused_residual.kernels import _common, fused_linear
    from fused_residual.kernels import fused_linear_configs as fl

    results, limits = compiled
    tuner = fused_linear.fused_linear_autotuned
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    defaults = {"HAS_SECOND": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "MASK": "none", "GATE": "identity",
                "STORE_PRE": False, "ACTIVATION": "identity", "B_ACTIVATION": "identity", "HAS_ROWSUM": False,
                "SPLIT_K": 1, "TMA_LAYOUT": ""}
    # the Hopper schedules' representative cases: test_hopper_schedules_compile_as_intended
    linear = [c for c in results if c["kernel"] == "fused_linear" and not c["variant"].startswith("hopper_")]
    variants = {(c["cap"], c["dtype"], c["variant"]) for c in linear}
    activation_variants = {name for name, *_ in aot_compile.activation_variants()}
    assert {cap for cap, _, _ in variants} == set(limits)

    def runnable(cap, dtype, flags, wide):
        monkeypatch.setattr(_common, "capability", lambda device: (cap // 10, cap % 10))
        args = {name: torch.empty(0, dtype=torch.float32 if name in wide else dtypes[dtype])
                for name in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")}
        args.update({"M": 1 << 16, "N": 4096, "K": 4096, "K2": 0})
        return {fl.config_key(c) for c in tuner.early_config_prune(tuner.configs, args, **{**defaults, **flags})}

    for cap, dtype, variant in sorted(variants):
        cases = [c for c in linear if (c["cap"], c["dtype"], c["variant"]) == (cap, dtype, variant)]
        flags, wide = cases[0]["flags"], {p for c in cases for p in c["wide"]}
        compiled_wide = {tuple(c["config"]) for c in cases if c["wide"]}
        compiled_plain = {tuple(c["config"]) for c in cases if not c["wide"]}
        expected_wide = runnable(cap, dtype, flags, wide) if wide else set()
        expected_plain = set() if variant.startswith("autocast") else runnable(cap, dtype, flags, ()) - expected_wide
        if variant.endswith("_unmasked"):
            masked = next(c["flags"] for c in linear if c["variant"] == variant.removesuffix("_unmasked"))
            expected_plain -= runnable(cap, dtype, masked, ())
        if aot_compile.sign_bits_source(variant) in activation_variants:
            expected_wide = {c for c in expected_wide if c[0] * c[1] > fl.SMALL_TILE}
            expected_plain = {c for c in expected_plain if c[0] * c[1] > fl.SMALL_TILE}
        name = f"sm{cap}-{dtype}-{variant}"
        assert (compiled_wide, compiled_plain) == (expected_wide, expected_plain), name


def _prune_hook_allows(monkeypatch, cap, dtype, flags, layout):
    """The configs fused_linear's prune hook keeps on a device of ``cap`` at a large problem, for a launch with
    ``flags`` whose operands have TMA_LAYOUT ``layout``."""
    from fused_residual.kernels import _common, fused_linear
    from fused_residual.kernels import fused_linear_configs as fl

    monkeypatch.setattr(_common, "capability", lambda device: (cap // 10, cap % 10))
    tuner = fused_linear.fused_linear_autotuned
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    args = {name: torch.empty(0, dtype=torch_dtype) for name in ("a_ptr", "b_ptr", "sa_ptr", "res_ptr", "c_ptr")}
    args.update({"M": 1 << 16, "N": 4096, "K": 4096, "K2": 4096 if flags.get("HAS_SECOND") else 0})
    flags = {"HAS_SECOND": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "MASK": "none", "GATE": "identity",
             "STORE_PRE": False, "ACTIVATION": "identity", "B_ACTIVATION": "identity", "HAS_ROWSUM": False,
             "SPLIT_K": 1, **flags, "TMA_LAYOUT": layout}
    return {fl.config_key(c) for c in tuner.early_config_prune(tuner.configs, args, **flags)}


def test_hopper_schedules_compile_as_intended(compiled, monkeypatch):
    """Each Hopper schedule is compiled (sm_90, both tritons) in the launches aot_compile.HOPPER_CASES names, each
    one the prune hook may give it; the PTX copies tiles with TMA exactly where the schedule says "tma", the tile
    loop is persistent exactly where it says "persistent", and the loop is warp-specialized where it says "ws"
    (no spills, shared memory and wgmma: the tests above)."""
    from fused_residual.kernels import fused_linear_configs as fl

    results, _ = compiled
    cases = [c for c in results if c["kernel"] == "fused_linear" and c["variant"].startswith("hopper_")]
    assert {tuple(c["config"]) for c in cases} == set(fl.HOPPER_SCHEDULES), "every schedule compiled"
    for c in cases:
        name = _name(c)
        features = fl.features(tuple(c["config"]))
        layout = aot_compile.TMA_LAYOUTS[c["layout"]]
        assert tuple(c["config"]) in _prune_hook_allows(monkeypatch, c["cap"], c["dtype"], c["flags"], layout), name
        if c["ok"]:
            assert (c["tma"], c["persistent"], c["warp_specialized"]) == (
                "tma" in features, "persistent" in features, "ws" in features), name


def test_hopper_schedules_go_to_sm90_16bit_gemms_with_tma_operands_only(monkeypatch):
    """sm_80 never receives a Hopper schedule, nor does an fp32, autocast or heavy-activation launch on sm_90,
    nor a "tma" schedule a launch whose operands do not qualify (TMA_LAYOUT ""), in any epilogue."""
    from fused_residual.kernels import fused_linear_configs as fl

    flag_sets = [dict(flags) for _, flags, _ in aot_compile.FUSED_LINEAR_VARIANTS + aot_compile.HOPPER_ONLY_VARIANTS]
    for flags in flag_sets:
        for cap, dtype in ((80, "fp16"), (80, "bf16"), (86, "bf16"), (89, "fp16"), (90, "fp32")):
            allowed = _prune_hook_allows(monkeypatch, cap, dtype, flags, "kk")
            assert allowed and not any(fl.features(c) for c in allowed), (cap, dtype, flags)
        for dtype in ("fp16", "bf16"):
            unaligned = _prune_hook_allows(monkeypatch, 90, dtype, flags, "")
            assert not any("tma" in fl.features(c) for c in unaligned), flags
            assert any(fl.features(c) for c in _prune_hook_allows(monkeypatch, 90, dtype, flags, "kk")), flags
            for wide, heavy in ((True, ()), (False, ("epilogue",))):
                table = fl.config_table((9, 0), 2, wide=wide, heavy=heavy, tma=True, warp_specialize=True)
                assert not any(fl.features(c) for c in table)


def test_shared_memory_fits_the_device(compiled):
    results, limits = compiled
    too_big = [f"{_name(c)}: {c['shared']} > {limits[c['cap']]}" for c in results
               if c["ok"] and c["shared"] > limits[c["cap"]]]
    assert not too_big, "\n".join(too_big)


def test_no_register_spills(compiled):
    results, _ = compiled
    spilling = [f"{_name(c)}: {c['spill_bytes']} spill bytes at {c['registers']} registers" for c in results
                if c["ok"] and c["spill_bytes"] != 0]
    assert not spilling, "\n".join(spilling)


def test_hopper_half_precision_gemms_use_wgmma(compiled):
    results, _ = compiled
    slow = [_name(c) for c in results if c["ok"] and c["cap"] == 90 and c["dtype"] != "fp32" and not c["wgmma"]]
    assert not slow, "sm_90 fp16/bf16 kernels without wgmma:\n" + "\n".join(slow)


def test_hopper_pipelines_its_loads(compiled):
    """Multi-stage configs must really be software-pipelined: their shared memory holds every stage."""
    results, _ = compiled
    for c in results:
        block_m, block_n, block_k, stages = c["config"][:4]
        element = 4 if c["dtype"] == "fp32" else 2
        if c["ok"] and c["cap"] == 90 and stages > 1:
            assert c["shared"] >= (stages - 1) * (block_m + block_n) * block_k * element, _name(c)


def test_whole_block_shared_memory_bound_holds(compiled):
    """The dispatcher's shared-memory estimate for the whole-block forward bounds what the compiler allocates."""
    from fused_residual.kernels import whole_block_configs as wbc

    results, _ = compiled
    element = {"fp16": 2, "bf16": 2, "fp32": 4}
    cases = [c for c in results if c["ok"] and c["kernel"] == "whole_block_forward"]
    assert cases
    for c in cases:
        flags, width = c["flags"], c["flags"]["WIDTH"]
        config = wbc.ForwardConfig(flags["BLOCK_M"], c["config"][4], flags["PROGRAMS_PER_SM"],
                                   flags["HIDDEN_CHUNK"], c["config"][3])
        x_element = 4 if "x_ptr" in c.get("wide", ()) else element[c["dtype"]]
        bound = wbc.forward_shared_bytes(config, width, element[c["dtype"]], x_element,
                                         (c["cap"] // 10, c["cap"] % 10))
        assert c["shared"] <= bound, f"{_name(c)}: {c['shared']} > estimated {bound}"


def test_streamed_forward_pipelines_its_weight_chunks(compiled):
    """The streamed forward's chunks of both weights really are multi-buffered: its shared memory holds every stage
    (sm_90; one fewer on sm_80, whose pipeliner keeps stages - 1 in flight)."""
    results, _ = compiled
    element = {"fp16": 2, "bf16": 2, "fp32": 4}
    cases = [c for c in results if c["ok"] and c["kernel"] == "whole_block_forward" and c["flags"]["HIDDEN_CHUNK"]]
    assert {c["cap"] for c in cases} == {90, 80}
    for c in cases:
        _, width, chunk, stages, _ = c["config"]
        buffers = stages if c["cap"] >= 90 else stages - 1
        assert c["shared"] >= buffers * 2 * width * chunk * element[c["dtype"]], _name(c)
