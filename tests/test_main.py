"""The main command: an example, the route taken, timing in alternation, and usage errors for bad options."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fused_residual import __main__ as main_command


def run(*args):
    return subprocess.run([sys.executable, "-m", "fused_residual", *args], capture_output=True, text=True,
                          timeout=300)


def test_main_prints_the_example_the_route_and_a_timing_table():
    result = run("--batch", "256", "--hidden", "32", "--blocks", "2", "--device", "cpu", "--rounds", "6")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ResidualNet(5, 10, 2, 2)" in out and "fused prediction" in out
    diff = float(out.split("max |reference - fused| = ")[1].split()[0])
    assert diff < 1e-5
    assert re.search(r"^route: (composite|torch|triton\S*) \(", out, flags=re.MULTILINE)
    assert "6 rounds, reference and fused alternated" in out
    for name in ("reference", "fused"):
        assert re.search(rf"^{name} +\d+\.\d+ +\d+\.\d+ - \d+\.\d+$", out, flags=re.MULTILINE), out
    assert re.search(r"speed-up of fused .*: median \d+\.\d+x, IQR \d+\.\d+x - \d+\.\d+x", out)


def test_main_train_mode():
    result = run("--batch", "64", "--hidden", "16", "--blocks", "1", "--train", "--device", "cpu", "--rounds", "5")
    assert result.returncode == 0, result.stderr
    assert "forward+backward" in result.stdout


def test_main_rejects_bad_options_with_a_usage_error():
    for args, message in ((("--batch", "0"), "must be positive"), (("--batch", "abc"), "not an integer"),
                          (("--device", "nope"), "not usable"), (("--dtype", "int8"), "invalid choice"),
                          (("--seconds", "-1"), "must be positive"), (("--rounds", "1.5"), "not an integer")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_every_option_has_help_and_shows_its_default():
    result = run("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option, default in (("--device", None), ("--dtype", "float32"), ("--batch", "8192"), ("--hidden", "256"),
                            ("--blocks", "4"), ("--seconds", "3.0")):
        assert option in text
        if default is not None:
            assert f"(default: {default})" in text.split(option, 2)[-1].split("--", 1)[0], option
    assert "(default: cpu)" in text or "(default: cuda)" in text
    assert "--rounds ROUNDS exact number" in text and "--train time forward + backward" in text


def test_alternation_switches_which_side_goes_first_every_round():
    order = []
    ticks = iter(range(1000))
    first, second = (lambda: order.append("A")), (lambda: order.append("B"))
    a, b = main_command.alternate(first, second, 4, clock=lambda: float(next(ticks)))
    assert order == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert len(a) == len(b) == 4 and all(t == 1.0 for t in a + b)  # one tick per timed call


def test_progress_reports_n_of_n_for_long_timings_only(capsys):
    assert main_command._progress_printer(0.5) is None
    show = main_command._progress_printer(10.0)
    show(2, 8, 2.0)
    show(8, 8, 8.0)
    assert capsys.readouterr().err.splitlines() == ["timing: round 2 of 8, ETA 6 s", "timing: round 8 of 8, ETA 0 s"]


@pytest.mark.parametrize("values, expected", [([1.0], (1.0, 1.0, 1.0)), ([1.0, 2.0, 3.0, 4.0, 5.0], (2.0, 3.0, 4.0))])
def test_quartiles(values, expected):
    assert main_command.quartiles(values) == expected
