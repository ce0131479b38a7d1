"""The examples of README.md's "Quickstart" and "Using it in your model" and of docs/deploying.md run as written
(CPU; the auto route)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Compiling and exporting go through deprecated helpers inside torch; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Using it in your model"
QUICKSTART = "## Quickstart"
DEPLOYING = ROOT / "docs" / "deploying.md"


def examples(heading: str = SECTION, path: Path = README) -> list[str]:
    """The python code blocks of ``path``: of its section ``heading``, or of the whole file if heading is None."""
    text = path.read_text()
    if heading is not None:
        assert heading in text, f"{path.name} has no section {heading!r}"
        text = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def deploying() -> list[str]:
    return examples(None, DEPLOYING)


SINGLE_PROCESS = [code for code in examples() if "init_process_group" not in code]
DISTRIBUTED = [code for code in examples() if "init_process_group" in code]


def test_the_section_has_an_example_for_each_topic():
    code = "\n".join(examples())
    for needle in ("fr.fuse(", "torch.compile(", "torch.autocast(", "checkpoint(", "save_on_cpu(",
                   "inference_mode(", "torch.save(", "torch.load(", "copy.deepcopy(", "DistributedDataParallel(",
                   "fully_shard("):
        assert needle in code, needle


@pytest.mark.parametrize("code", SINGLE_PROCESS, ids=[f"example{i}" for i in range(len(SINGLE_PROCESS))])
def test_example_runs(code, tmp_path, monkeypatch, use_backend):
    use_backend("auto")
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


@pytest.mark.distributed
@pytest.mark.skipif(torch.__version__ < "2.8", reason="FSDP2 on CPU needs gloo's reduce_scatter (PyTorch >= 2.8)")
def test_distributed_example_runs_under_torchrun(tmp_path):
    (code,) = DISTRIBUTED
    script = tmp_path / "train.py"
    script.write_text(code)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]


def test_quickstart_example_runs(monkeypatch, use_backend, tmp_path):
    (code,) = examples(QUICKSTART)
    use_backend("auto")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


def test_the_quickstart_is_in_the_first_40_lines_and_covers_a_first_hour():
    lines = README.read_text().splitlines()
    start = lines.index(QUICKSTART)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    assert end <= 40, f"the quickstart ends at line {end}"
    text = "\n".join(lines[start:end])
    for needle in ("--index-url https://download.pytorch.org/whl/cpu", "'.[gpu]'", "fr.FusedResidualBlock(",
                   "fr.fuse(", "python -m fused_residual info", "python -m pytest -q", "python -m pytest benchmarks",
                   "python -m benchmarks.report"):
        assert needle in text, needle


def test_the_deploying_page_has_an_example_for_each_route():
    code = "\n".join(deploying())
    for needle in ("torch.onnx.export(", "onnxruntime.InferenceSession(", "torch.export.export(",
                   "run_decompositions(", "aoti_compile_and_package(", "aoti_load_package(", "fr.unfuse("):
        assert needle in code, needle


@pytest.mark.parametrize("code", deploying(), ids=[f"deploying{i}" for i in range(len(deploying()))])
def test_deploying_example_runs(code, tmp_path, monkeypatch, use_backend):
    if "onnx" in code:  # test extras; skipped where they are not installed
        for package in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(package)
    use_backend("auto")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/deploying.md", "exec"), {"__name__": "readme_example"})
