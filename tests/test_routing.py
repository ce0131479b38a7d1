"""Routing and the backend registry: one place decides, a written contract, never a silent fallback when forced."""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
from conftest import TRITON_INSTALLED

import fused_residual as fr
from fused_residual import backends, dispatch
from fused_residual.activations import REFERENCE_FORM, Form
from fused_residual.backends import Backend


def _route(x, training=False, form=REFERENCE_FORM):
    return dispatch.route(x, torch.empty(x.shape[-1], x.shape[-1], dtype=x.dtype), None, form, training)


def test_auto_uses_the_torch_backend_or_the_composite_on_cpu(use_backend):
    use_backend("auto")
    for training in (False, True):
        chosen = _route(torch.empty(8, 4), training)
        assert chosen.backend is None or chosen.backend is backends.get("torch")


def test_the_cpu_rule_runs_the_composite_below_the_function_rows_and_the_torch_backend_from_them(
        use_backend, no_tables):
    use_backend("auto")
    rows = dispatch.CPU_FUNCTION_ROWS
    for training in (False, True):
        assert _route(torch.empty(16, 8), training) is dispatch.COMPOSITE
        assert _route(torch.empty(rows // 2, 8), training) is dispatch.COMPOSITE
        assert _route(torch.empty(rows // 2 + 1, 8), training).name == "torch"  # row bucket: rows rounded up
        assert _route(torch.empty(4 * rows, 8), training).name == "torch"


def test_a_named_backend_is_used_when_asked(use_backend):
    use_backend("torch")
    assert _route(torch.empty(1, 4)).name == "torch"


def test_unknown_backend_name_is_a_value_error(use_backend):
    use_backend("cudnn")
    with pytest.raises(ValueError, match="'cudnn' is not one of auto, composite, torch, triton"):
        fr.FusedResidualBlock(4, 4)(torch.randn(2, 4))


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_unknown_variant_is_a_value_error(use_backend):
    use_backend("triton:fastest")
    with pytest.raises(ValueError, match="no variant 'fastest'.*whole_block, two_gemm"):
        fr.FusedResidualBlock(4, 4)(torch.randn(2, 4))


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_forced_triton_on_cpu_without_interpreter_raises(use_backend, monkeypatch):
    use_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block = fr.FusedResidualBlock(4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        block(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="forced"), torch.no_grad():
        block(torch.randn(2, 4))


def test_forced_triton_without_triton_installed_raises(use_backend, monkeypatch):
    use_backend("triton")
    monkeypatch.setattr(backends, "missing_requirement", lambda name: "triton" if name == "triton" else None)
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        fr.FusedResidualBlock(4, 4)(torch.randn(2, 4))


@pytest.fixture
def no_tables(monkeypatch):
    """No dispatch tables: the conservative rule decides (and no CUDA device is asked for its name)."""
    monkeypatch.setattr(dispatch, "_device_tables", functools.cache(lambda device: ()))


@pytest.fixture
def h200(fake_gpu_device):
    """CUDA devices read as an H200 (sm_90: the hopper family, where the conservative rule's wins were measured)."""
    fake_gpu_device((9, 0), name="NVIDIA H200")


def _fake_cuda(dtype=torch.float32, rows=65536, width=128):
    x = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(rows, width), numel=lambda: rows * width)
    w = SimpleNamespace(dtype=dtype, shape=(width, width))
    return x, w


def test_auto_without_triton_uses_torch_or_the_composite_even_for_cuda(use_backend, monkeypatch, no_tables, h200):
    use_backend("auto")
    monkeypatch.setattr(backends, "missing_requirement", lambda name: "triton" if name == "triton" else None)
    x, w = _fake_cuda()
    assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "torch"
    assert dispatch.route(x, w, None, REFERENCE_FORM, True) is dispatch.COMPOSITE


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_auto_on_cuda_follows_the_dispatch_winner(use_backend, monkeypatch, h200):
    use_backend("auto")
    seen = []

    def winner(device, dtype, width, hidden, rows, projection, training):
        seen.append((dtype, width, hidden, rows, projection, training))
        return {False: "triton:whole_block", True: "composite"}[training], "a test's winner"

    monkeypatch.setattr(dispatch, "_winner", winner)  # the choice and why (dispatch.winner keeps the choice)
    x, w = _fake_cuda(torch.bfloat16, rows=1000)
    assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "triton:whole_block"
    assert dispatch.route(x, w, None, REFERENCE_FORM, True) is dispatch.COMPOSITE
    assert seen == [(torch.bfloat16, 128, 128, 1000, False, False), (torch.bfloat16, 128, 128, 1000, False, True)]
    # Decisions are cached per row bucket: another batch size in the same bucket asks no more.
    x2, _ = _fake_cuda(torch.bfloat16, rows=900)
    dispatch.route(x2, w, None, REFERENCE_FORM, False)
    assert len(seen) == 2


def test_auto_sends_float64_to_torch_and_forced_triton_refuses_it(use_backend, no_tables, h200):
    use_backend("auto")
    x, w = _fake_cuda(torch.float64)
    assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "torch"
    if TRITON_INSTALLED:
        use_backend("triton")
        with pytest.raises(RuntimeError, match="float16, bfloat16 or float32, not torch.float64"):
            fr.FusedResidualBlock(4, 4).double()(torch.randn(2, 4, dtype=torch.float64))


def test_routes_and_the_requested_choice_follow_the_environment_at_run_time(use_backend):
    use_backend("torch")
    assert dispatch.requested() == "torch"
    use_backend("auto")
    assert dispatch.requested() == "auto"


def test_import_works_without_triton():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; import fused_residual as fr, torch; "
            "print(fr.FusedResidualBlock(3, 3)(torch.randn(2, 3)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 3])" in result.stdout


# ---- the backend contract -----------------------------------------------------------------------------------

CONTRACT = sorted({*Backend.__annotations__, *(name for name, member in vars(Backend).items()
                                                if callable(member) and not name.startswith("_"))})


def test_the_contract_lists_what_the_code_calls():
    assert set(CONTRACT) >= {"NAME", "VARIANTS", "unavailable", "block_forward", "block_backward", "linear",
                             "linear_residual_relu_forward", "linear_residual_relu_backward", "takes_net",
                             "net_forward"}


@pytest.mark.parametrize("name", backends.names())
def test_every_registered_backend_provides_the_contract(name):
    if backends.missing_requirement(name) is not None:
        pytest.skip(f"needs {backends.missing_requirement(name)}")
    backend = backends.get(name)
    assert backend.NAME == name
    for member in CONTRACT:
        assert hasattr(backend, member), f"backend {name} lacks {member}"
        expected = vars(Backend).get(member)
        if callable(expected):
            wanted = list(inspect.signature(expected).parameters)[1:]  # without self
            assert list(inspect.signature(getattr(backend, member)).parameters) == wanted, member


def test_a_third_backend_registers_by_name_and_is_used(use_backend, monkeypatch):
    """Registering a module under a new name makes it a FUSED_RESIDUAL_BACKEND value (a copy of the torch
    backend under another name stands in for, say, another GPU vendor's)."""
    import sys
    import types

    calls = []
    module = types.ModuleType("third_backend")
    torch_backend = backends.get("torch")
    for member in CONTRACT:
        setattr(module, member, getattr(torch_backend, member))
    module.NAME = "third"

    def block_forward(*args, **kwargs):
        calls.append(1)
        return torch_backend.block_forward(*args, **kwargs)

    module.block_forward = block_forward
    monkeypatch.setitem(sys.modules, "third_backend", module)
    backends.register("third", "third_backend")
    try:
        use_backend("third")
        torch.manual_seed(0)
        reference, fused = fr.ResidualBlock(6, 6), fr.FusedResidualBlock(6, 6)
        fused.load_state_dict(reference.state_dict())
        x = torch.randn(4, 6)
        torch.testing.assert_close(fused(x), reference(x))
        assert calls == [1]
    finally:
        backends._REGISTRY.pop("third")
        backends._LOADED.pop("third", None)
        dispatch.reset()


def test_form_validation_names_the_choices():
    with pytest.raises(ValueError, match="activation='tanh' is not one of 'relu', 'gelu', 'gelu_tanh', 'silu'"):
        fr.FusedResidualBlock(4, 4, activation="tanh")
    with pytest.raises(ValueError, match="final_activation='gelu' must be 'relu'"):
        fr.FusedResidualBlock(4, 4, final_activation="gelu")
    assert Form("gelu", None).output_dtype(torch.float32, torch.bfloat16, False) == torch.float32
    assert Form().output_dtype(torch.float32, torch.bfloat16, False) == torch.bfloat16


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_conservative_rule_takes_triton_only_where_the_first_measurement_found_it_faster(use_backend, no_tables, h200):
    use_backend("auto")
    for dtype in (torch.bfloat16, torch.float16):
        x, w = _fake_cuda(dtype, rows=65536, width=128)
        assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "triton:whole_block"
        assert dispatch.route(x, w, None, REFERENCE_FORM, True) is dispatch.COMPOSITE
        for rows, width in ((1024, 128), (65536, 64), (65536, 256)):
            x, w = _fake_cuda(dtype, rows=rows, width=width)
            assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "torch"
    x, w = _fake_cuda(torch.float32, rows=65536, width=128)
    assert dispatch.route(x, w, None, REFERENCE_FORM, False).name == "torch"


def test_dispatch_table_lookup_takes_the_nearest_row_bucket_of_the_same_widths(tmp_path, monkeypatch):
    table = {"format": 1, "device": "NVIDIA TEST", "capability": [9, 0], "torch": "x", "triton": "x",
             "date": "2026-01-01", "commit": "test", "entries": [
                 {"dtype": "bfloat16", "width": 64, "rows": 1024, "mode": "forward", "winner": "torch"},
                 {"dtype": "bfloat16", "width": 64, "rows": 65536, "mode": "forward",
                  "winner": "triton:whole_block"},
                 {"dtype": "bfloat16", "width": 64, "rows": 65536, "mode": "train", "winner": "triton:two_gemm"}]}
    path = tmp_path / "dispatch-test.json"
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, str(path))
    dispatch.reset()
    try:
        found = dispatch.tables()
        assert found[0].device == "NVIDIA TEST"
        lookup = dispatch.lookup
        assert lookup(found, torch.bfloat16, 64, 64, 900, "forward") == "torch"
        assert lookup(found, torch.bfloat16, 60, 60, 40000, "forward") == "triton:whole_block"  # padded to 64
        assert lookup(found, torch.bfloat16, 64, 64, 8192, "forward") == "torch"  # 2^13: nearer 2^10 than 2^16
        assert lookup(found, torch.bfloat16, 64, 64, 100, "train") == "triton:two_gemm"
        assert lookup(found, torch.float16, 64, 64, 65536, "forward") is None
        assert lookup(found, torch.bfloat16, 128, 128, 65536, "forward") is None
    finally:
        monkeypatch.delenv(dispatch.TABLE_ENV_VAR)
        dispatch.reset()


def test_a_malformed_dispatch_table_is_an_error_not_a_silent_default():
    with pytest.raises(ValueError, match="format"):
        dispatch.parse({"format": 99, "entries": []}, "t.json")
    with pytest.raises(ValueError, match="bad entry"):
        dispatch.parse({"format": 1, "device": "d", "capability": [9, 0], "entries": [
            {"dtype": "bfloat16", "width": 64, "rows": 1, "mode": "forward", "winner": "fastest"}]}, "t.json")


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_unmeasured_forms_take_no_triton_route_under_auto(use_backend, no_tables, h200):
    """Only the reference form was measured: a GELU block at the measured width gets the cuBLAS composite."""
    use_backend("auto")
    x, w = _fake_cuda(torch.bfloat16, rows=65536, width=128)
    assert dispatch.route(x, w, None, Form("gelu", "relu"), False).name == "torch"
    assert dispatch.route(x, w, None, Form("gelu", None), True) is dispatch.COMPOSITE
