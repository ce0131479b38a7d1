"""Cold start: before compiling anything, each autotuner prunes its candidates by shape, dtype and device.

A first call at a new width compiles and benchmarks every candidate its autotuner keeps, so fewer candidates start
faster (issue 10 item 3). These tests run the kernels' tuned launch paths in the interpreter, with Triton's
benchmark step replaced by a recorder, and check that the configs the autotuner would compile for a launch are
exactly the ones expected for that width, dtype and device (nothing that cannot run there: the ahead-of-time
tests prove each expected one compiles for its architecture without spills and within its shared memory).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from fused_residual import backends

pytestmark = pytest.mark.interpreter

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _common, whole_block  # noqa: E402
from fused_residual.kernels import fused_linear as fl  # noqa: E402
from fused_residual.kernels import fused_linear_configs as flc  # noqa: E402
from fused_residual.kernels import whole_block_configs as wbc  # noqa: E402

SHARED = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376}  # opt-in shared memory per block, bytes


@pytest.fixture
def compiled(monkeypatch):
    """``compiled(capability)``: run the kernels' tuned paths as on a device of ``capability`` and return the
    configs their autotuners benchmarked (compiled) for the launches made meanwhile, plus the chosen one (triton 3.9
    skips the benchmark when one candidate is left; 3.6 runs it)."""
    seen = []

    def record(tuner):
        def bench(*args, config, **kwargs):
            seen.append(config)
            return [len(seen)] * 3  # the first candidate (the largest tile) wins: the fewest interpreted programs

        monkeypatch.setattr(tuner, "_bench", bench)
        monkeypatch.setattr(tuner, "cache", {})

    record(whole_block.whole_block_forward_autotuned)
    record(fl.fused_linear_autotuned)

    def on(capability):
        seen.clear()
        monkeypatch.setattr(_common, "on_interpreter", lambda device: False)
        monkeypatch.setattr(_common, "capability", lambda device: capability)
        monkeypatch.setattr(_common, "max_shared_memory", lambda device: SHARED[capability])
        return seen

    return on


def _block_params(width, dtype, x_dtype=None, rows=40):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(rows, width, generator=g).to(x_dtype or dtype)
    w1, w2 = ((torch.randn(width, width, generator=g) / width**0.5).to(dtype) for _ in range(2))
    b1, b2 = (torch.randn(width, generator=g).to(dtype) for _ in range(2))
    return x, w1, b1, w2, b2


F = wbc.ForwardConfig
# (capability, weights' dtype, x's dtype, padded width) -> the forward's candidates (fp16 stands for bf16: the
# prune reads element sizes; the interpreter has no bfloat16).
WHOLE_BLOCK_CANDIDATES = {
    ((9, 0), torch.float16, torch.float16, 256): {F(64, 8, 0, 32, 3), F(128, 8, 0, 32, 2)},
    ((9, 0), torch.float16, torch.float32, 256): {F(64, 8, 0, 32, 3)},  # autocast: 128 rows spill
    ((8, 0), torch.float16, torch.float16, 256): {F(64, 8, 0, 32, 3)},
    ((8, 6), torch.float16, torch.float16, 256): set(),  # 99 KB: the backend does not take it there
    ((9, 0), torch.float16, torch.float16, 128): {F(64, 4, 0), F(128, 8, 0)},
    ((8, 6), torch.float16, torch.float16, 128): {F(64, 4, 0)},  # 128 rows need 128 KB
    ((9, 0), torch.float16, torch.float16, 64): {F(64, 4, 0), F(128, 8, 0), F(64, 4, 2), F(128, 8, 2)},
    ((9, 0), torch.float16, torch.float16, 16): {F(64, 4, 0), F(128, 4, 0), F(128, 8, 0), F(64, 4, 2),
                                                  F(128, 8, 2)},
    ((9, 0), torch.float32, torch.float32, 256): {F(64, 8, 0, 16, 3)},
    ((8, 0), torch.float32, torch.float32, 128): {F(64, 8, 0, 16, 3)},
    ((9, 0), torch.float32, torch.float32, 64): {F(64, 4, 0), F(128, 8, 0), F(64, 4, 2), F(128, 8, 2)},
}


@pytest.mark.parametrize("case", WHOLE_BLOCK_CANDIDATES, ids=lambda c: f"sm{c[0][0]}{c[0][1]}-"
                         f"{str(c[1]).removeprefix('torch.')}-x{str(c[2]).removeprefix('torch.')}-width{c[3]}")
def test_whole_block_forward_compiles_only_its_candidates(compiled, case):
    capability, dtype, x_dtype, width = case
    expected = WHOLE_BLOCK_CANDIDATES[case]
    features = width - 3 if width > 16 else width  # ragged: the padded width decides
    x, w1, b1, w2, b2 = _block_params(features, dtype, x_dtype)
    fits = wbc.runnable_forward_configs(width, w1.element_size(), x.element_size(), capability, SHARED[capability])
    assert set(fits) == expected
    if not expected:
        return  # the backend's test (whole_block_forward_fits) sends such a call to the two-GEMM kernels
    seen = compiled(capability)
    out, _ = whole_block.forward(x, w1, b1, w2, b2, store_saved=False, out_dtype=dtype)
    tuner = whole_block.whole_block_forward_autotuned
    assert {wbc.config_of(c) for c in [*seen, tuner.best_config]} == expected
    assert len(seen) in (0, len(expected)) if len(expected) == 1 else len(seen) == len(expected)
    h64 = torch.relu(x.to(dtype).double() @ w1.double().t() + b1.double())
    assert_close(out, torch.relu(h64 @ w2.double().t() + b2.double() + x.double()), "out", dtype=dtype,
                 scale=width / 16)


# fused_linear on sm_80 in fp16 (the Ampere table) and on sm_90 in fp32, for the two-GEMM block's forward launches
# at three widths and 130 rows (enough that no row tile is pruned as larger than the problem): linear1 (bias, ReLU)
# and linear2 (bias, residual, ReLU: no tile above 128 x 128). Tiles wider or deeper than the padded width are
# pruned; counts as read off fused_linear's tables.
LINEAR_CANDIDATES = {
    ((8, 0), torch.float16, 16): (1, 1),
    ((8, 0), torch.float16, 64): (4, 4),
    ((8, 0), torch.float16, 256): (7, 6),
    ((9, 0), torch.float32, 128): (6, 6),
}


@pytest.mark.parametrize("case", LINEAR_CANDIDATES, ids=lambda c: f"sm{c[0][0]}{c[0][1]}-"
                         f"{str(c[1]).removeprefix('torch.')}-width{c[2]}")
def test_two_gemm_launches_compile_only_their_candidates(compiled, case):
    capability, dtype, width = case
    x, w1, b1, w2, b2 = _block_params(width, dtype, rows=130)
    counts = []
    for kwargs in ({"bias": b1, "activation": "relu"}, {"bias": b2, "residual": x, "activation": "relu"}):
        seen = compiled(capability)
        out = fl.fused_linear(x, w1.t(), **kwargs)[0]
        best = flc.config_key(fl.fused_linear_autotuned.best_config)
        configs = {flc.config_key(c) for c in seen} | {best}
        element = x.element_size()
        table = flc.config_table(capability, element)
        assert configs <= set(table), "a candidate outside the device's table"
        assert all(c[1] <= width and c[2] <= width for c in configs), "a tile wider than the problem"
        counts.append(len(configs))
        expected = x.double() @ w1.double().t() + b1.double() if "residual" not in kwargs else \
            x.double() @ w1.double().t() + b2.double() + x.double()
        assert_close(out, torch.relu(expected), "out", scale=width / 16)
    assert tuple(counts) == LINEAR_CANDIDATES[case]


def test_cold_start_benchmark_runs_three_processes_on_one_cache(monkeypatch, tmp_path):
    """``benchmarks.cold_start`` on CUDA: empty, warm (kernels from disk, autotuning again) and warm_tuned
    (TRITON_CACHE_AUTOTUNING=1, which the first process also had) share one Triton cache directory."""
    import json
    import subprocess

    from benchmarks import cold_start

    calls = []

    def run(command, env, **kwargs):
        calls.append((env["TRITON_CACHE_DIR"], env["TRITON_CACHE_AUTOTUNING"]))
        return subprocess.CompletedProcess(command, 0, json.dumps({"outcome": "passed", "first_step_s": 1.0,
                                                                   "second_step_s": 0.1}) + "\n", "")

    monkeypatch.setattr(cold_start.subprocess, "run", run)
    found = cold_start.measure("cuda", "bf16", 16, 256, "triton", 10.0, tmp_path / "cold.jsonl")
    assert [r["cache"] for r in found] == ["empty", "warm", "warm_tuned"]
    assert [tuned for _, tuned in calls] == ["1", "0", "1"] and len({cache for cache, _ in calls}) == 1
