"""The main command: the seed example and a timing table, with clear errors for bad options."""

from __future__ import annotations

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fused_residual", *args], capture_output=True, text=True,
                          timeout=300)


def test_main_prints_seed_example_and_timing_table():
    result = run("--batch", "256", "--hidden", "32", "--blocks", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ResidualNet(5, 10, 2, 2)" in out and "fused prediction" in out
    diff = float(out.split("max |reference - fused| = ")[1].split()[0])
    assert diff < 1e-5
    assert "reference" in out and "speed-up" in out


def test_main_train_mode():
    result = run("--batch", "64", "--hidden", "16", "--blocks", "1", "--train", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "forward+backward" in result.stdout


def test_main_rejects_bad_options_clearly():
    for args, message in ((("--batch", "0"),  "positive integer"), (("--device", "nope"), "not usable"),
                          (("--dtype", "int8"), "invalid choice")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
