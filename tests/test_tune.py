"""python -m fused_residual.tune: measures, writes a table dispatch reads, and auto then follows it."""

from __future__ import annotations

import json
import re

import pytest
import torch

import fused_residual as fr
from fused_residual import dispatch, tune
from fused_residual.activations import REFERENCE_FORM


def test_tune_writes_a_table_that_dispatch_reads(tmp_path):
    out = tmp_path / "table.json"
    assert tune.main(["--device", "cpu", "--widths", "16", "--rows", "16,64", "--seconds", "0.05",
                      "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["format"] == dispatch.FORMAT and data["torch"] == torch.__version__
    assert [(e["rows"], e["mode"]) for e in data["entries"]] == [(16, "forward"), (16, "train"), (64, "forward"),
                                                                  (64, "train")]
    for entry in data["entries"]:
        assert set(entry["us"]) == {"reference", "torch", "composite"}
        assert all(t > 0 for t in entry["us"].values())
        assert entry["winner"] == min(("torch", "composite"), key=lambda n: entry["us"][n])
        assert entry["disagreed"] == []
    table = dispatch.parse(data, str(out))
    assert dispatch.lookup((table,), torch.float32, 16, 16, 20, "train") == data["entries"][1]["winner"]


def test_a_stopped_tune_keeps_what_it_measured(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    measured = tune.measure
    calls = []

    def stop_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a time limit's SIGINT does
        return measured(*args)

    monkeypatch.setattr(tune, "measure", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--device", "cpu", "--widths", "16", "--rows", "16,64", "--seconds", "0.05", "--out", str(out)])
    data = json.loads(out.read_text())
    assert len(data["entries"]) == 2
    dispatch.parse(data, str(out))


def test_a_candidate_that_disagrees_with_the_reference_cannot_win(tmp_path, monkeypatch):
    from fused_residual.backends import torch_backend

    original = torch_backend.block_forward

    def wrong(*args, **kwargs):
        out, saved = original(*args, **kwargs)
        return out + 1, saved

    monkeypatch.setattr(torch_backend, "block_forward", wrong)
    entry = tune.measure(torch.device("cpu"), torch.float32, 16, 32, False, 0.05)
    assert entry["disagreed"] == ["torch"] and entry["winner"] == "composite"


@pytest.mark.parametrize("winner", ["composite", "torch"])
def test_auto_follows_a_tuned_table_in_the_user_cache(tmp_path, monkeypatch, use_backend, winner):
    use_backend("auto")
    monkeypatch.setenv(dispatch.CACHE_ENV_VAR, str(tmp_path))
    table = tune.header(torch.device("cpu"))
    table["entries"] = [{"dtype": "float32", "width": 32, "rows": 128, "mode": "train", "winner": winner}]
    (tmp_path / "dispatch-cpu.json").write_text(json.dumps(table))
    dispatch.reset()
    try:
        x, w = torch.empty(100, 32), torch.empty(32, 32)
        assert dispatch.route(x, w, None, REFERENCE_FORM, True).name == winner
        assert dispatch.route(x, w, None, REFERENCE_FORM, False) is dispatch.COMPOSITE  # no forward entry: the CPU rule
        block = fr.FusedResidualBlock(32, 32)
        block(torch.randn(100, 32, requires_grad=True)).sum().backward()
        assert block.linear1.weight.grad is not None
    finally:
        dispatch.reset()


# ---- the command line --------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "widths_not_integers": ["--widths", "abc"],
    "widths_zero": ["--widths", "0"],
    "widths_repeated": ["--widths", "16,16"],
    "widths_empty_item": ["--widths", "16,,32"],
    "rows_zero": ["--rows", "0"],
    "rows_negative": ["--rows", "-4"],
    "rows_float": ["--rows", "1.5"],
    "device_unknown": ["--device", "foo"],
    "device_meta": ["--device", "meta"],
    "modes_unknown": ["--modes", "forward,training"],
    "modes_repeated": ["--modes", "forward,forward"],
    "modes_empty": ["--modes", ""],
    "dtypes_short_spelling": ["--dtypes", "fp16"],
    "dtypes_float64": ["--dtypes", "float64"],
    "budget_negative": ["--budget-s", "-1"],
    "seconds_zero": ["--seconds", "0"],
    "seconds_nan": ["--seconds", "nan"],
}
if not torch.cuda.is_available():
    BAD_OPTIONS["device_cuda_without_one"] = ["--device", "cuda"]


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_bad_option_is_a_usage_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "measure", lambda *a, **k: pytest.fail("measured despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        tune.main([*BAD_OPTIONS[case], "--out", str(tmp_path / "t.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "error: argument --" in err and "Traceback" not in err
    assert not (tmp_path / "t.json").exists()


def test_a_bad_option_in_a_fresh_process_prints_no_traceback():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fused_residual.tune", "--widths", "abc"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --widths: 'abc' is not an integer" in done.stderr


def test_every_option_has_help_that_shows_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = ["--device", "--out", "--budget-s", "--seconds", "--dtypes", "--widths", "--rows", "--modes"]
    parts = {opt: text.split(f" {opt} ", 1)[1] for opt in options}
    for opt, rest in parts.items():
        described = rest.split(" --", 1)[0]
        assert "(default: " in described, f"{opt} shows no default: {described!r}"
    assert "bfloat16" in parts["--dtypes"] and "fp16" not in parts["--dtypes"]


def test_modes_are_measured_each_once_in_the_order_given(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tune, "measure", lambda device, dtype, width, rows, training, seconds: calls.append(
        (dtype, width, rows, training)) or {"dtype": dispatch.DTYPE_NAMES[dtype], "width": width, "rows": rows,
                                            "mode": "train" if training else "forward", "winner": "torch",
                                            "us": {"reference": 2.0, "torch": 1.0}, "reference_over_winner": 2.0,
                                            "disagreed": []})
    tune.main(["--device", "cpu", "--dtypes", "float32", "--widths", "16,32", "--rows", "8", "--modes", "train",
               "--out", str(tmp_path / "t.json")])
    assert calls == [(torch.float32, 16, 8, True), (torch.float32, 32, 8, True)]


def test_the_progress_line_says_n_of_total_and_an_eta(tmp_path, monkeypatch, capsys):
    def fake_measure(device, dtype, width, rows, training, seconds):
        return {"dtype": "float32", "width": width, "rows": rows, "mode": "train" if training else "forward",
                "winner": "torch", "us": {"reference": 2.0, "torch": 1.0}, "reference_over_winner": 2.0,
                "disagreed": []}

    monkeypatch.setattr(tune, "measure", fake_measure)
    tune.main(["--device", "cpu", "--widths", "16,32", "--rows", "8", "--out", str(tmp_path / "t.json")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "ETA" in line]
    assert [line.split("]")[0].split("[")[1].split(",")[0] for line in lines] == [f"{n} of 4" for n in range(1, 5)]
    assert all(re.search(r"ETA (\d+m)?\d+s\]", line) for line in lines)


def test_a_write_stopped_midway_leaves_the_previous_table_and_no_temporary_file(tmp_path, monkeypatch):
    import os
    import pathlib

    out = tmp_path / "table.json"
    writes = []
    real_os_replace, real_path_replace = os.replace, pathlib.Path.replace

    def stop_the_third(real):
        def replace(*args, **kwargs):
            writes.append(args)
            if len(writes) == 3:
                raise KeyboardInterrupt  # stopped between writing the new table and putting it in place
            return real(*args, **kwargs)
        return replace

    monkeypatch.setattr(os, "replace", stop_the_third(real_os_replace))
    monkeypatch.setattr(pathlib.Path, "replace", stop_the_third(real_path_replace))
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--device", "cpu", "--widths", "16", "--rows", "16,64", "--seconds", "0.05", "--out", str(out)])
    assert len(json.loads(out.read_text())["entries"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]
