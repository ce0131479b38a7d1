"""Package metadata: one version, a license file, type information and the data files shipped in the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fused_residual

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once_in_the_package():
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fused_residual.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", fused_residual.__version__)


def test_the_changelog_names_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {fused_residual.__version__} " in text


def test_the_license_file_matches_the_metadata():
    project = pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_gpu_extra_sets_a_triton_floor_without_an_upper_pin():
    (requirement,) = pyproject()["project"]["optional-dependencies"]["gpu"]
    assert re.fullmatch(r"triton>=[\d.]+", requirement)


def test_the_wheel_ships_py_typed_the_license_and_the_dispatch_tables_readme(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                                  "__pycache__", "results", ".*_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. setuptools' BuildBackendWarning
    (wheel,) = tmp_path.glob("fused_residual-*.whl")
    assert wheel.name.startswith(f"fused_residual-{fused_residual.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("fused_residual/py.typed", "fused_residual/dispatch_tables/README.md",
                     "fused_residual/kernels/fused_linear.py"):
        assert expected in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
