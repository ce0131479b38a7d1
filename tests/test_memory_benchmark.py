"""The memory benchmark (``python -m benchmarks.memory``): its records, table, report page and plot."""

from __future__ import annotations

import json

import pytest

from benchmarks import memory, memory_report

ROWS, WIDTH = 64, 16
FP32 = 4


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    found = [memory.measure(case, rounds=2, inner=1) for case in memory.cases(["block", "net", "ffn"], ROWS, WIDTH,
                                                                             "fp32", "cpu")]
    return found


def _by(records, kind, x_grad=True):
    return next(r for r in records if r["kind"] == kind and r["x_grad"] == x_grad)


def test_the_reference_and_checkpoint_keep_what_autograd_is_known_to_keep(records):
    act = ROWS * WIDTH * FP32
    block = _by(records, "block")
    assert block["impls"]["reference"]["kept"]["nbytes"] == 3 * act  # x, h, out
    assert block["impls"]["checkpoint"]["kept"]["nbytes"] == act  # x alone
    net = _by(records, "net")
    # x0 (linear1's input), a0, each block's h and out (out is the next layer's input).
    assert net["impls"]["reference"]["kept"]["nbytes"] == (2 + 2 * memory.NET_BLOCKS) * act
    assert net["impls"]["checkpoint"]["kept"]["nbytes"] == (2 + memory.NET_BLOCKS) * act
    ffn = _by(records, "ffn")
    # x, linear1's output (gelu's input) and gelu's output (linear2's input), both 4x wide.
    assert ffn["impls"]["reference"]["kept"]["nbytes"] == (1 + 2 * memory.FFN_HIDDEN) * act
    assert ffn["kept_over_reference"]["checkpoint"] == pytest.approx(1 / (1 + 2 * memory.FFN_HIDDEN))


def test_recompute_keeps_x_and_what_its_final_relu_needs(records):
    act = ROWS * WIDTH * FP32
    for x_grad in (True, False):
        # x and the sign bits (1 bit per element); a net's blocks keep their outputs, the next layers' inputs.
        assert _by(records, "block", x_grad)["impls"]["recompute"]["kept"]["nbytes"] == act + ROWS * WIDTH // 8
        assert _by(records, "net", x_grad)["impls"]["recompute"]["kept"]["nbytes"] == (2 + memory.NET_BLOCKS) * act
        assert _by(records, "ffn", x_grad)["impls"]["recompute"]["kept"]["nbytes"] == act


def test_every_implementation_is_measured_and_checked(records):
    for r in records:
        assert r["kept_over_reference"]["reference"] == 1.0
        assert list(r["impls"]) == list(memory.IMPLS)
        for name, info in r["impls"].items():
            assert info["step_ms"]["n"] == 2 and info["step_ms"]["median"] > 0
            if name != "reference":
                assert info["parity"] <= memory.PARITY["fp32"]
        assert r["recompute_over_fused_time"]["n"] == 2
        json.dumps(r)  # a JSON line


def test_report_page_and_plot(records, tmp_path):
    page, png = memory_report.write_report(records, tmp_path)
    text = page.read_text()
    for r in records:
        assert r["case"] in text
    assert "checkpoint of the reference" in text and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_are_judged_only_at_their_size(records):
    at_size = {**_by(records, "block"), "rows": 4096, "width": 256}
    assert memory_report._target(at_size, "recompute") == memory.TARGETS[("block", "recompute")]
    assert memory_report._target(_by(records, "block"), "recompute") is None


@pytest.mark.parametrize("argv", [["--rounds", "-1"], ["--inner", "0"], ["--kinds", "block,mlp"], ["--rows", "0"]])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        memory.main(argv)
    assert e.value.code == 2


def test_cli_writes_jsonl_and_show_reads_it(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    assert memory.main(["--kinds", "block", "--rows", "32", "--width", "8", "--rounds", "0", "--jsonl",
                        str(path)]) == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["case"] for line in lines] == ["block-32x8-fp32-cpu-x_grad", "block-32x8-fp32-cpu-x_frozen"]
    capsys.readouterr()
    assert memory.main(["--show", str(path)]) == 0
    assert "block-32x8-fp32-cpu-x_frozen" in capsys.readouterr().out
