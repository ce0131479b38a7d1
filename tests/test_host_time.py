"""The host-time benchmark (``benchmarks/host_time.py``) end to end on this CPU, in a process of its own (it needs
compiled kernels, not the interpreter, and changes process-wide state): one width, both modes, the whole-block
route, a few calls. The counts it reports are deterministic, so they are checked here; the times are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_residual import backends

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import host_time  # noqa: E402

pytestmark = pytest.mark.aot

if backends.missing_requirement("triton") is None:
    from triton.backends import backends as triton_backends

    HAS_NVIDIA_BACKEND = "nvidia" in triton_backends
else:
    HAS_NVIDIA_BACKEND = False


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend (compiles for sm_90)")
def test_host_time_benchmark_runs_and_counts(tmp_path, capsys):
    found, stdout = host_time.measure_in_subprocess("--quick", "--widths", "64", "--routes", "whole_block",
                                                    "--rounds", "2", "--inner", "3")
    assert "host+3us*launches" in stdout
    found = {r["mode"]: r for r in found}
    assert set(found) == {"forward", "train"}
    forward, train = found["forward"], found["train"]
    assert forward["fused"]["triton_launches"] == {"whole_block_forward_kernel": 1}
    assert forward["fused"]["aten_launches"] == {}
    assert forward["eager"]["aten_launches"] == {"addmm": 2, "relu_": 2, "add_": 1}
    assert (forward["fused"]["allocations"], forward["eager"]["allocations"]) == (1, 2)
    assert train["fused"]["triton_launches"] == {"whole_block_forward_kernel": 1, "whole_block_backward_kernel": 1}
    assert train["fused"]["aten_launches"] == {"sum": 1, "ones_like": 1}  # y.sum() and backward's seed
    assert train["eager"]["launches"]["total"] == 16
    for record in found.values():
        assert record["eager"]["calls"]["package"] == 1  # ResidualBlock.forward
        assert record["fused"]["calls"]["package"] > 3  # the module, the plan, its steps and launch at least
        assert record["fused"]["package_functions"]["fused_residual/modules.py:FusedResidualBlock.forward"] == 1
        for side in ("fused", "eager"):
            host = record[side]["host_us"]
            assert host["calls"] == 6 and 0 < host["q1"] <= host["median"] <= host["q3"]
            assert record[side]["estimate_us"] == pytest.approx(host["median"] + 3 * record[side]["launches"]["total"])
        assert record["fused_over_eager"]["host"] == pytest.approx(
            record["fused"]["host_us"]["median"] / record["eager"]["host_us"]["median"])

    out = tmp_path / "saved.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in found.values()))
    assert host_time.main(["--show", str(out)]) == 0  # the saved run's table, as the run printed it
    shown = capsys.readouterr().out.strip()
    assert shown == stdout[stdout.index("case "):].strip()


RESTORE_SCRIPT = """
import torch
import triton
from triton.runtime.driver import driver
from benchmarks.fake_gpu import fake_gpu
from fused_residual.kernels import _common, _launch

meta = torch.device("meta")
before = (torch.cuda.get_device_properties, torch.cuda._initialized, driver._active, _common.multiprocessors,
          _common.launch_device)
with fake_gpu():
    assert _common.multiprocessors(meta) == 132 and _common.max_shared_memory(meta) == 232448
    assert isinstance(_common.launch_device(meta), torch.cuda.device)
    assert triton.runtime.driver.active.get_current_target().arch == 90
    # Hopper's tables and the launch cache (NVIDIA's launcher), as on the H200 it stands in for.
    assert _common.family(meta).name == "hopper" and _launch.launcher_problem() is None
    assert torch.cuda.current_device() == 0 and torch.cuda.get_device_name() == "NVIDIA H200"
after = (torch.cuda.get_device_properties, torch.cuda._initialized, driver._active, _common.multiprocessors,
         _common.launch_device)
assert after == before, (before, after)
assert _common.multiprocessors(meta) == 2  # the interpreter's answer again: meta is no GPU outside the block
print("restored")
"""


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend")
def test_fake_gpu_answers_as_an_h200_inside_and_restores_everything_after():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "restored", done.stdout[-2000:] + done.stderr[-3000:]


UNCOUNTED_SCRIPT = """
import torch
import fused_residual as fr
from benchmarks.fake_gpu import fake_gpu

with fake_gpu() as gpu, torch.no_grad():
    block = fr.FusedResidualBlock(64, 64, device="meta", dtype=torch.bfloat16)
    x = torch.empty(4096, 64, device="meta", dtype=torch.bfloat16)
    for _ in range(3):
        block(x)
    launch = gpu.launch
    assert sum(gpu.launches.values()) == 3, gpu.launches
    with gpu.uncounted():  # what was bound (the replay's C launch) now does nothing, in C
        assert gpu.launch is launch and launch.func == "".format
        for _ in range(5):
            block(x)
    assert sum(gpu.launches.values()) == 3 and launch.func == gpu.count
    block(x)
    assert sum(gpu.launches.values()) == 4
print("uncounted")
"""


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend (compiles for sm_90)")
def test_the_fake_launch_bound_by_a_plan_counts_except_while_timed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSED_RESIDUAL_BACKEND"] = "triton"
    done = subprocess.run([sys.executable, "-c", UNCOUNTED_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "uncounted", done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend (compiles for sm_90)")
def test_two_gemm_allocates_no_more_than_eager():
    """At width 256 the two-GEMM kernels take TMA schedules on sm_90, whose device-side descriptors need Triton's
    global scratch per launch: it comes from a cached buffer, so a cached call allocates no more than eager."""
    found, _ = host_time.measure_in_subprocess("--widths", "256", "--routes", "two_gemm", "--rounds", "1", "--inner",
                                               "1")
    assert {r["mode"] for r in found} == {"forward", "train"}
    for record in found:
        fused, eager = record["fused"], record["eager"]
        assert fused["allocations"] <= eager["allocations"], (record["mode"], fused["allocations"])
        assert fused["triton_launches"] == {"fused_linear_kernel": 2 if record["mode"] == "forward" else 6}
