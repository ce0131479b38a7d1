"""``python -m fused_residual info``: versions, device, dispatch tables found and skipped, and the route of a block
call with its reason; route decisions logged once per new signature at DEBUG; usage errors exit 2.

Deterministic: every route here is fixed by a forced backend, a table written by the test, a hooked block or the
CPU rule at a row count far from its threshold."""

from __future__ import annotations

import json
import logging
import types
import warnings

import pytest
import torch
from conftest import TRITON_INSTALLED
from fused_residual.kernels import _common

import fused_residual as fr
from fused_residual import __main__ as main_command
from fused_residual import dispatch, info
from fused_residual.activations import REFERENCE_FORM


def run_info(capsys, *args: str) -> str:
    assert main_command.main(["info", *args]) == 0
    return capsys.readouterr().out


def route_of(out: str, label: str) -> str:
    (line,) = [line for line in out.splitlines() if line.strip().startswith(label)]
    return line


@pytest.fixture
def tables_here(tmp_path, monkeypatch, use_backend):
    """The user cache is ``tmp_path``, no table named by the variable, ``auto``. (Tables shipped with the package
    are of GPUs: none applies to the CPU calls asked about here.)"""
    use_backend("auto")
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(dispatch.TABLE_ENV_VAR, raising=False)
    dispatch.reset()
    yield tmp_path
    dispatch.reset()


def cpu_table(width: int, rows: int, winner: str, mode: str = "forward") -> dict:
    return {"format": 1, "device": "cpu", "capability": [0, 0], "torch": "x", "triton": None, "date": "2026-01-01",
            "commit": "test", "entries": [{"dtype": "float32", "width": width, "rows": rows, "mode": mode,
                                           "winner": winner}]}


def test_versions_device_interpreter_and_the_variable(capsys, tables_here, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = run_info(capsys, "--device", "cpu", "--width", "32")
    first = out.splitlines()[0]
    assert first.startswith(f"fused_residual {fr.__version__}, torch {torch.__version__}") and "Python 3." in first
    assert "device: cpu (the Triton kernels run here in Triton's interpreter)" in out
    assert "Triton interpreter: on (TRITON_INTERPRET='1')" in out
    assert "FUSED_RESIDUAL_BACKEND: auto" in out and "dispatch tables (highest precedence first):" in out


@pytest.mark.parametrize("choice", ["torch", "composite"])
def test_a_forced_backend_says_so(capsys, tables_here, use_backend, choice):
    use_backend(choice)
    line = route_of(run_info(capsys, "--device", "cpu", "--width", "32"), "width 32:")
    assert line.endswith(f"width 32: {choice}; forced by FUSED_RESIDUAL_BACKEND={choice}")


@pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")
def test_forced_triton_names_its_kernels_or_says_why_it_cannot_run(capsys, tables_here, use_backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    use_backend("triton")
    out = run_info(capsys, "--device", "cpu", "--width", "32,512", "--train")
    assert route_of(out, "width 32:").endswith("triton; forced by FUSED_RESIDUAL_BACKEND=triton; kernels: "
                                               "whole_block forward, whole_block backward")
    assert "kernels: two_gemm forward, two_gemm backward" in route_of(out, "width 512:")
    out = run_info(capsys, "--device", "cpu", "--width", "32", "--dtype", "bfloat16")
    assert "width 32: error: FUSED_RESIDUAL_BACKEND=triton was forced" in out and "bfloat16" in out


def test_a_measured_table_entry_decides_and_is_named(capsys, tables_here):
    path = tables_here / "dispatch-cpu.json"
    path.write_text(json.dumps(cpu_table(32, 1 << 16, "composite")))  # where the CPU rule would say torch
    out = run_info(capsys, "--device", "cpu", "--width", "32,64", "--rows", "65536")
    assert f"  {path}: cpu (capability 0.0), 1 entry; used here" in out
    assert route_of(out, "width 32:").endswith(f"width 32: composite; measured table {path} (cpu), entry float32 "
                                               "width 32 hidden 32 forward rows 65536")
    assert route_of(out, "width 64:").endswith("width 64: torch; conservative rule: on the CPU the torch backend "
                                               "from 4096 rows (no table entry)")


def test_the_conservative_rule_says_which_part_of_it_decided(capsys, tables_here):
    out = run_info(capsys, "--device", "cpu", "--width", "32", "--rows", "16", "--train")
    assert "composite; conservative rule: on the CPU the plain composite below 4096 rows" in route_of(out, "width 32:")


def test_a_corrupt_table_is_listed_as_skipped_with_why(capsys, tables_here):
    (tables_here / "dispatch-broken.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # info lists it; it does not warn as well
        out = run_info(capsys, "--device", "cpu", "--width", "32")
    assert f"  skipped {tables_here / 'dispatch-broken.json'}: not valid JSON" in out
    assert "width 32: torch; conservative rule" in out


def test_an_unreadable_named_table_is_an_error_on_every_auto_route(capsys, tables_here, monkeypatch):
    bad = tables_here / "named.json"
    bad.write_text("[]")
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, str(bad))
    dispatch.reset()
    out = run_info(capsys, "--device", "cpu", "--width", "32")
    assert f"  error: {dispatch.TABLE_ENV_VAR}={bad}: cannot read this dispatch table" in out
    assert route_of(out, "width 32:").startswith(f"  width 32: error: {dispatch.TABLE_ENV_VAR}={bad}")


# ---- --model: factories this module holds (``--model test_info:<factory>``) ---------------------------------

def hooked_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), fr.FusedResidualBlock(32, 32), fr.FusedResidualBlock(32, 32),
                                fr.ResidualBlock(32, 32),
                                fr.FusedResidualBlock(32, 32, hidden_features=64, activation="gelu",
                                                      final_activation=None))
    model[2].linear1.register_forward_hook(lambda module, args, out: None)
    return model


def not_a_model() -> int:
    return 3


def test_each_block_of_a_model_with_its_route_and_why(capsys, tables_here):
    out = run_info(capsys, "--model", "test_info:hooked_model", "--rows", "65536")
    assert "routes of the model's blocks (forward, 65536 rows" in out
    assert route_of(out, "1 (").endswith("1 (FusedResidualBlock, width 32, hidden 32, float32): torch; conservative "
                                         "rule: on the CPU the torch backend from 4096 rows (no table entry)")
    assert route_of(out, "2 (").endswith("calls its submodules (the plain composite, no kernels): linear1 has "
                                         "forward or backward hooks (weight_norm/spectral_norm register one)")
    assert "the reference block, eager PyTorch; once fr.fuse(model) swaps it: torch;" in route_of(out, "3 (")
    assert ("activation gelu, final none): torch; conservative rule" in route_of(out, "4 (")
            and "only the reference block's form was measured" in route_of(out, "4 ("))


def test_global_module_hooks_send_every_block_to_its_submodules(capsys, tables_here):
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        out = run_info(capsys, "--model", "test_info:hooked_model")
    finally:
        handle.remove()
    assert "calls its submodules (the plain composite, no kernels): global module hooks" in route_of(out, "1 (")


@pytest.mark.parametrize("args, message", [
    (["--width", "0"], "must be positive"), (["--width", "32,abc"], "not an integer"), (["--rows", "-1"], "positive"),
    (["--dtype", "fp16"], "invalid choice"), (["--device", "nope"], "not usable here"),
    (["--model", "test_info"], "is not module:factory"), (["--model", "no_such_module_here:f"], "cannot import"),
    (["--model", "test_info:missing"], "has no callable 'missing'"),
    (["--model", "test_info:not_a_model"], "returned a int, not an nn.Module"),
    (["--model", "test_info:hooked_model", "--width", "32"], "leave out --width and --dtype"),
])
def test_usage_errors_exit_2_without_a_traceback(capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        main_command.main(["info", *args])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and "Traceback" not in err


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as stopped:
        main_command.main(["info", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stopped.value.code == 0
    for option in ("--width", "--rows", "--dtype", "--train", "--device", "--model"):
        assert option in text
    assert "(default: 4096)" in text and "(default: None)" not in text


def test_the_family_comes_from_the_device_facts(monkeypatch):
    seen = []
    monkeypatch.setattr(_common, "family", lambda device: seen.append(device) or types.SimpleNamespace(name="cdna3"))
    assert info.device_family(torch.device("cpu")) == "cdna3"
    assert seen == [torch.device("cpu")]


# ---- logging: once per new signature, at DEBUG, with the reason; nothing on a cached call -------------------------

def test_route_decisions_are_logged_once_per_new_signature(caplog, use_backend):
    use_backend("torch")
    x, w = torch.empty(64, 16), torch.empty(16, 16)
    with caplog.at_level(logging.DEBUG, logger="fused_residual"):
        for _ in range(3):
            dispatch.route(x, w, None, REFERENCE_FORM, False)
        dispatch.route(torch.empty(5000, 16), w, None, REFERENCE_FORM, False)  # another row bucket: a new signature
    messages = [r.getMessage() for r in caplog.records if r.name == "fused_residual"]
    assert len(messages) == 2, messages
    assert messages[0] == ("route torch for a block of width 16, hidden 16, identity shortcut, activation relu, "
                           "final relu, 64 rows, forward on cpu: forced by FUSED_RESIDUAL_BACKEND=torch")
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "fused_residual")


def test_a_cached_route_decides_nothing(use_backend, monkeypatch):
    use_backend("auto")
    calls = []
    decide = dispatch.decide
    monkeypatch.setattr(dispatch, "decide", lambda *args: calls.append(args) or decide(*args))
    x, w = torch.empty(64, 16), torch.empty(16, 16)
    first = dispatch.route(x, w, None, REFERENCE_FORM, True)
    for _ in range(5):
        assert dispatch.route(x, w, None, REFERENCE_FORM, True) is first
    assert len(calls) == 1
