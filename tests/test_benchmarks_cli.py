"""The benchmark commands' command lines: bad values are usage errors (exit 2, no traceback), dtypes are spelled as
torch spells them, ``--help`` shows every default once, long runs print "n of N, ETA"."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest

from benchmarks import cli, host_time, records, report


@pytest.mark.parametrize("text, expected", [("3", 3), ("64", 64)])
def test_positive_takes_positive_numbers(text, expected):
    assert cli.positive(int)(text) == expected and cli.positive(float)("0.5") == 0.5


@pytest.mark.parametrize("kind, text", [(int, "0"), (int, "-3"), (int, "abc"), (int, "2.5"), (float, "0"),
                                        (float, "nan"), (float, "x")])
def test_positive_refuses_the_rest(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive(kind)(text)


def test_lists_and_dtypes():
    assert cli.positive_ints("64, 256") == [64, 256]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_ints("64,0")
    assert cli.choices_of(("forward", "train"))("train,forward") == ["train", "forward"]
    with pytest.raises(argparse.ArgumentTypeError, match="backward"):
        cli.choices_of(("forward", "train"))("forward,backward")
    assert [cli.short_dtype(t) for t in ("bfloat16", "float16", "float32", "bf16")] == ["bf16", "fp16", "fp32", "bf16"]
    with pytest.raises(argparse.ArgumentTypeError, match="bfloat16, float16, float32"):
        cli.short_dtype("float64")


def test_progress_counts_and_estimates_from_the_mean_pace(capsys):
    ticks = itertools.count(0.0, 10.0)  # each clock reading 10 s after the last
    progress = cli.Progress("host time", 4, clock=lambda: next(ticks))
    assert progress.step("forward w64") == "host time: 1 of 4 done, 10 s, ETA 30 s (forward w64)"
    assert progress.step() == "host time: 2 of 4 done, 20 s, ETA 20 s"
    assert capsys.readouterr().err.splitlines()[-1] == "host time: 2 of 4 done, 20 s, ETA 20 s"


@pytest.mark.parametrize("args", [["--widths", "abc"], ["--widths", "64,-1"], ["--rounds", "0"], ["--inner", "x"],
                                  ["--modes", "forward,back"], ["--routes", "whole"], ["--rows", "0"],
                                  ["--dtype", "fp64"], ["--dtype", "float64"], ["--show", "/no/such/file.jsonl"]])
def test_host_time_refuses_bad_values_with_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as stopped:
        host_time._parse(args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "error:" in err and "Traceback" not in err


def test_host_time_takes_the_main_commands_dtype_spelling():
    args = host_time._parse(["--dtype", "float16", "--widths", "32,64", "--modes", "train", "--quick"])
    assert (args.dtype, args.widths, args.modes, args.rounds, args.inner) == ("fp16", [32, 64], ["train"], 5, 10)
    assert host_time._parse([]).dtype == "bf16"  # the records keep the suite's short names


def _help_of(main, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("main", [host_time.main, report.main])
def test_help_shows_each_default_once(main, capsys):
    text = " ".join(_help_of(main, capsys).split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not any(part.count("default") > 1 for part in text.split("--"))


def test_host_time_help_lists_torch_dtype_names_only(capsys):
    text = _help_of(host_time.main, capsys)
    assert "{bfloat16,float16,float32}" in text and "bf16" not in text


def test_records_compact_refuses_a_missing_or_broken_file(tmp_path, capsys):
    assert records.main(["compact", str(tmp_path / "missing.json"), str(tmp_path / "out.jsonl")]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert records.main(["compact", str(broken), str(tmp_path / "out.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
    assert records.main(["compact", str(tmp_path)]) == 2  # wrong arguments: the usage line
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"benchmarks": [], "machine_info": {}, "commit_info": {}}))
    assert records.main(["compact", str(run), str(tmp_path / "out.jsonl")]) == 0
