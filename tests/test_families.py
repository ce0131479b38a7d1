"""Device families: each GPU a user may have gets its family's tables, limits and schedules, and the conservative
rule's measured wins only on the family they were measured on.

A faked device (``fake_gpu_device``: the torch queries ``kernels/_common.py`` makes answer as that GPU) for each
compute capability and AMD architecture below; no GPU is needed. What each family gets is written out here by hand
(the expectation is not computed by the code under test): its family, whether its fused-linear launches may take
TMA schedules, its 16-bit tile table, the whole-block kernels' widest widths, TF32, and what ``auto`` runs for the
one shape the H200 measured a win on (the whole-block forward, bf16, width 128, 65536 rows).
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import pytest
import torch
from fused_residual.kernels import _common
from fused_residual.kernels import fused_linear_configs as flc
from fused_residual.kernels import whole_block_configs as wbc

from fused_residual import dispatch
from fused_residual.activations import REFERENCE_FORM

CUDA = torch.device("cuda", 0)
# (capability, gfx architecture or None) -> (family, TMA schedules, 16-bit classic tiles, whole-block backward's
# widest width, 16-bit and fp32 forward's widest widths, TF32, auto's choice for the H200's win).
EXPECTED = {
    ((7, 5), None): ("other", False, flc.OTHER_16BIT, 0, 0, 0, False, "torch"),
    ((8, 0), None): ("ampere", False, flc.AMPERE_16BIT, 32, 256, 256, True, "torch"),
    ((8, 6), None): ("consumer", False, flc.CONSUMER_16BIT, 32, 128, 64, True, "torch"),
    ((8, 9), None): ("consumer", False, flc.CONSUMER_16BIT, 32, 128, 64, True, "torch"),
    ((9, 0), None): ("hopper", True, flc.HOPPER_16BIT, 128, 256, 256, True, "triton:whole_block"),
    ((10, 0), None): ("blackwell", True, flc.HOPPER_16BIT, 128, 256, 256, True, "torch"),
    ((10, 3), None): ("blackwell", True, flc.HOPPER_16BIT, 128, 256, 256, True, "torch"),
    ((12, 0), None): ("blackwell_consumer", False, flc.BLACKWELL_CONSUMER_16BIT, 32, 128, 64, True, "torch"),
    ((12, 1), None): ("blackwell_consumer", False, flc.BLACKWELL_CONSUMER_16BIT, 32, 128, 64, True, "torch"),
    ((9, 0), "gfx90a"): ("cdna2", False, flc.CDNA_16BIT, 16, 64, 64, False, "torch"),
    ((9, 4), "gfx942"): ("cdna3", False, flc.CDNA_16BIT, 16, 64, 64, True, "torch"),
    ((9, 5), "gfx950"): ("cdna4", False, flc.CDNA4_16BIT, 32, 128, 64, False, "torch"),
    ((12, 0), "gfx1201"): ("other", False, flc.OTHER_16BIT, 0, 0, 0, False, "torch"),
}


def _id(key):
    (major, minor), gfx = key
    return gfx or f"sm_{major}{minor}"


def _fake_tensor(shape, element_size):
    return SimpleNamespace(shape=shape, device=CUDA, element_size=lambda: element_size)


def _widest_forward(element_size: int) -> int:
    from fused_residual.backends import triton_backend

    fits = [w for w in (16, 32, 64, 128, 256) if triton_backend.whole_block_forward_fits(
        _fake_tensor((8, w), element_size), _fake_tensor((w, w), element_size), None)]
    return max(fits, default=0)


@pytest.mark.parametrize("key", EXPECTED, ids=_id)
def test_each_gpu_gets_its_family_tables_and_rule(fake_gpu_device, monkeypatch, key):
    capability, gfx = key
    name, tma, tiles, backward_width, forward_width, fp32_forward_width, tf32, win_choice = EXPECTED[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setattr(_common, "_warned", set())
        found = fake_gpu_device(capability, gfx)
    assert found.name == name
    assert found.hip == (gfx is not None)
    # One warning for a GPU of no known family, none for the others.
    assert len([w for w in caught if "no kernel tables" in str(w.message)]) == (name == "other")
    # Tables: the classic 16-bit tiles, and the TMA schedules only where the family has TMA (and operands qualify).
    classic = flc.config_table(found.name, 2)
    assert classic == tiles
    with_tma = flc.config_table(found.name, 2, tma=True, warp_specialize=True)
    assert any("tma" in flc.features(e) for e in with_tma) == tma
    assert all(flc.features(e) == () or set(flc.features(e)) <= set(flc.AMD_OPTIONS) for e in classic)
    amd_knobs = any(set(flc.features(e)) & set(flc.AMD_OPTIONS) for e in with_tma)
    assert amd_knobs == (name.startswith("cdna"))
    # The whole-block kernels: widest widths (the forward by the family's shared memory, as the device reports it).
    monkeypatch.setattr(_common, "max_shared_memory", lambda device: found.shared_memory)
    assert wbc.max_backward_width(found.name) == backward_width
    assert (_widest_forward(2), _widest_forward(4)) == (forward_width, fp32_forward_width)
    # TF32 for fp32 dots where PyTorch allows it and the family takes it.
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert (_common.input_precision(_FakeFp32()) == "tf32") == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    # The conservative rule: the H200's measured win only on Hopper; PyTorch's ops everywhere else, AMD included.
    monkeypatch.setattr(dispatch, "_device_tables", functools.cache(lambda device: ()))
    assert dispatch.winner(CUDA, torch.bfloat16, 128, 128, 1 << 16, False, False) == win_choice
    assert dispatch.winner(CUDA, torch.bfloat16, 128, 128, 1 << 16, False, True) == "composite"
    assert dispatch.winner(CUDA, torch.float16, 64, 64, 1 << 16, False, False) == "torch"


class _FakeFp32:
    dtype = torch.float32
    device = CUDA


@pytest.mark.filterwarnings("ignore:fused_residual. no kernel tables")
def test_hip_is_detected_before_the_capability(fake_gpu_device):
    """An MI250X reads (9, 0), like an H100; an RDNA4 card (12, 0), like an RTX 50xx: the gfx architecture decides."""
    assert fake_gpu_device((9, 0), "gfx90a").name == "cdna2"
    assert fake_gpu_device((9, 0)).name == "hopper"
    assert fake_gpu_device((12, 0), "gfx1201").name == "other"
    assert fake_gpu_device((12, 0)).name == "blackwell_consumer"


def test_an_unknown_gpu_warns_once_per_architecture(fake_gpu_device, monkeypatch):
    monkeypatch.setattr(_common, "_warned", set())
    with pytest.warns(UserWarning, match=r"no kernel tables for sm_75 \(Fake GPU\)"):
        assert fake_gpu_device((7, 5)).name == "other"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _common.family.cache_clear()
        assert _common.family(CUDA).name == "other"  # asked again (another device of it): no second warning
    with pytest.warns(UserWarning, match="no kernel tables for sm_130"):
        fake_gpu_device((13, 0))


def test_the_interpreter_takes_hopper_tables():
    assert _common.family(torch.device("cpu")) is _common.FAMILIES["hopper"]


@pytest.mark.filterwarnings("ignore:fused_residual. no kernel tables")
def test_dispatch_tables_match_by_name_then_family_never_capability(fake_gpu_device, monkeypatch):
    """A table measured on an H100 serves another Hopper GPU by family; an MI250X, whose capability reads (9, 0)
    too, gets none of it; a table without a family serves only its own device name."""
    h100 = dispatch.Table("NVIDIA H100", (9, 0), "h100.json", {}, "hopper")
    old_h100 = dispatch.Table("NVIDIA H100 OLD", (9, 0), "old.json", {}, None)
    mi250 = dispatch.Table("AMD Instinct MI250X", (9, 0), "mi250x.json", {}, "cdna2")
    monkeypatch.setattr(dispatch, "tables", lambda: (old_h100, h100, mi250))
    fake_gpu_device((9, 0), name="NVIDIA H200")
    assert dispatch._device_tables(CUDA) == (h100,)
    fake_gpu_device((9, 0), gfx="gfx90a", name="AMD Instinct MI210")
    assert dispatch._device_tables(CUDA) == (mi250,)
    fake_gpu_device((9, 0), name="NVIDIA H100 OLD")
    assert dispatch._device_tables(CUDA) == (old_h100, h100)
    fake_gpu_device((7, 5), name="Tesla T4")
    assert dispatch._device_tables(CUDA) == ()


def test_a_table_names_a_known_family_or_none():
    base = {"format": 1, "device": "d", "capability": [9, 0], "entries": []}
    assert dispatch.parse({**base, "family": "cdna3"}, "t.json").family == "cdna3"
    assert dispatch.parse(base, "t.json").family is None
    with pytest.raises(ValueError, match="family 'sm_90' is not one of"):
        dispatch.parse({**base, "family": "sm_90"}, "t.json")


def test_auto_on_an_unverified_family_falls_back_to_torch_once(use_backend, monkeypatch):
    """Where ``auto`` picks the Triton kernels on a family they have not run on and they fail on the first call of
    a signature, that call and later ones of the signature run the torch backend, with one warning; a forced
    backend raises the failure. (The kernels' failure is simulated: the interpreter runs them here.)"""
    pytest.importorskip("triton")
    import fused_residual as fr
    from fused_residual import backends

    use_backend("auto")
    monkeypatch.setattr(dispatch, "_family_name", lambda device: "blackwell")
    monkeypatch.setattr(dispatch, "_winner", lambda *args: ("triton:two_gemm", "a table entry (simulated)"))
    triton_backend = backends.get("triton")
    calls = []

    def broken(*args, **kwargs):
        calls.append("triton")
        raise RuntimeError("simulated: no kernel image for this device")

    monkeypatch.setattr(triton_backend, "plan_block_forward", broken)
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(16, 16)
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match="Triton kernels failed on blackwell.*RuntimeError: simulated"):
        with torch.no_grad():
            out = block(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            again = block(torch.randn(32, 16))  # another row count of the signature: torch, no warning
    assert calls == ["triton"]
    w1, b1, w2, b2 = block.linear1.weight, block.linear1.bias, block.linear2.weight, block.linear2.bias
    x64 = x.double()
    want = torch.relu(torch.relu(x64 @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double() + x64)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert again.shape == (32, 16)
    use_backend("triton")  # forced: the failure is raised
    with pytest.raises(RuntimeError, match="simulated"), torch.no_grad():
        block(x)
    assert calls == ["triton", "triton"]
    with pytest.raises(RuntimeError, match="verified"):  # a route auto took on a verified family: raised too
        dispatch.fall_back(dispatch.Route(triton_backend), dispatch.signature(x, w1, None, REFERENCE_FORM),
                           RuntimeError("verified"))
