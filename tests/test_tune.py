"""python -m fused_residual.tune: measures, writes a table dispatch reads, and auto then follows it."""

from __future__ import annotations

import json

import pytest
import torch

import fused_residual as fr
from fused_residual import dispatch, tune
from fused_residual.activations import SEED_FORM


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
        assert dispatch.route(x, w, None, SEED_FORM, True).name == winner
        assert dispatch.route(x, w, None, SEED_FORM, False) is dispatch.COMPOSITE  # no forward entry: the CPU rule
        block = fr.FusedResidualBlock(32, 32)
        block(torch.randn(100, 32, requires_grad=True)).sum().backward()
        assert block.linear1.weight.grad is not None
    finally:
        dispatch.reset()
