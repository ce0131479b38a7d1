"""The benchmark suite's own machinery: shape sets, the parity gate, the work model and the memory counters."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, checks, clocks, env_info, harness, impls  # noqa: E402
from benchmarks.cases import Case  # noqa: E402

CPU_BENCHMARK_SHAPES = {(16, 10), (4096, 64), (16384, 128), (4096, 512), (1024, 1024), (65536, 32)}


class FakeBenchmark:
    """The parts of pytest-benchmark's fixture the harness uses, disabled (runs the target once)."""

    enabled = False

    def __init__(self) -> None:
        self.extra_info: dict = {}
        self.group: str | None = None
        self.calls = 0

    def pedantic(self, target, rounds=1, iterations=1, warmup_rounds=0):
        self.calls += 1
        return target()


def test_cpu_timed_set_is_the_six_block_shapes_in_every_mode():
    block = cases.select("reduced", ["cpu"], "block")
    assert {(c.rows, c.width) for c in block} == CPU_BENCHMARK_SHAPES
    assert {c.mode for c in block} == {"forward", "train", "train-sum"} and {c.dtype for c in block} == {"fp32"}
    assert {c.impl for c in block} == {"eager", "compile", "fused"}
    assert cases.select("full", ["cpu"], "block") == block


@pytest.mark.parametrize("shape_set", cases.SHAPE_SETS)
def test_case_ids_are_unique_and_start_with_the_device(shape_set):
    selected = [c for kind in ("block", "net") for c in cases.select(shape_set, ["cpu", "cuda"], kind)]
    ids = [c.id for c in selected]
    assert len(ids) == len(set(ids))
    assert all(c.id.startswith(c.device + "-") for c in selected)
    assert all("cpu" not in c.id for c in selected if c.device == "cuda")  # `-k cpu` selects CPU cases only


def test_full_cuda_set_covers_every_width_row_count_and_dtype():
    block = cases.select("full", ["cuda"], "block")
    assert {(c.rows, c.width, c.dtype) for c in block} == {
        (r, w, d) for r in cases.CUDA_ROWS for w in cases.CUDA_WIDTHS for d in cases.DTYPES
    }
    assert {c.impl for c in block} == {"eager", "compile", "max-autotune", "fused", "bare-gemm", "addmm-act",
                                       "reduce-overhead", "fused-reduce-overhead"}
    nets = cases.select("full", ["cuda"], "net")
    assert {c.width for c in nets} <= set(range(64, 1025)) and {c.blocks for c in nets} <= set(range(4, 9))


def test_addmm_activation_is_forward_only_and_gemm_bounds_are_blocks_only():
    for shape_set in cases.SHAPE_SETS:
        for kind in ("block", "net"):
            for c in cases.select(shape_set, ["cpu", "cuda"], kind):
                if c.impl == "addmm-act":
                    assert c.mode == "forward" and c.kind == "block" and c.device == "cuda"
                if c.impl in cases.CUDA_ONLY_IMPLS:
                    assert c.device == "cuda"
                if c.impl == "bare-gemm":
                    assert c.kind == "block"


def test_relative_error_is_scaled_by_the_reference_and_flags_nonfinite_mismatches():
    expected = torch.tensor([0.0, 2.0, -4.0])
    assert checks.relative_error(expected.clone(), expected) == 0.0
    assert checks.relative_error(torch.tensor([0.0, 2.0, -3.0]), expected) == pytest.approx(0.25)
    assert checks.relative_error(torch.tensor([0.0, 2.0, -3.0]), expected, "l2") == pytest.approx(1 / 20**0.5)
    assert checks.relative_error(torch.tensor([float("nan"), 2.0, -4.0]), expected) == float("inf")
    assert checks.relative_error(torch.zeros(2), expected) == float("inf")
    with_nan = torch.tensor([float("nan"), 1.0])
    assert checks.relative_error(with_nan.clone(), with_nan) == 0.0


def test_one_row_changed_by_a_mask_flip_passes_the_norm_wise_gradient_check():
    """A ReLU mask flip between two correct implementations changes one row of dx: the element-wise error is
    large, the norm-wise one is not."""
    torch.manual_seed(0)
    expected = torch.randn(16384, 64)
    actual = expected.clone()
    actual[3142] = torch.randn(64)
    _, l2_tolerance = checks.PARITY_TOLERANCE[("cpu", "fp32")]
    assert checks.relative_error(actual, expected) > 0.1
    assert checks.relative_error(actual, expected, "l2") < l2_tolerance


def _runner_scaling_gradients(module, factor):
    def run(x, dout):
        for p in module.parameters():
            p.grad = None
        out = module(x)
        out.register_hook(lambda g: g * factor)  # right output, wrong gradients
        out.backward(dout)
        return out

    return run


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_parity_gate_fails_a_wrong_answer(mode):
    case = Case("cpu", "fp32", mode, 64, 16, "fused")
    reference = impls.build_reference(case)
    wrong = copy.deepcopy(reference)
    with torch.no_grad():
        wrong.linear2.bias.add_(0.05)  # a slightly wrong bias: output and every gradient shift
    impl = impls.Impl("fused", impls.module_runner(wrong, wrong, mode), wrong)
    x, dout = harness.make_inputs(case, 1)[0]
    with pytest.raises(AssertionError, match="differs from the eager reference"):
        checks.check_parity(case, impl, reference, x, dout)
    right = impls.build_impl(case, reference)
    errors = checks.check_parity(case, right, reference, x, dout)
    tensors = ["out"] if mode == "forward" else [
        "out", "dx", "dlinear1.weight", "dlinear1.bias", "dlinear2.weight", "dlinear2.bias"]
    assert set(errors) == {"out", *(f"{name}_l2" for name in tensors)}
    out_tolerance, l2_tolerance = checks.PARITY_TOLERANCE[("cpu", "fp32")]
    assert errors["out"] <= out_tolerance and max(errors.values()) <= l2_tolerance


def test_parity_gate_fails_wrong_gradients_with_a_right_output():
    case = Case("cpu", "fp32", "train", 64, 16, "fused")
    reference = impls.build_reference(case)
    module = copy.deepcopy(reference)
    impl = impls.Impl("fused", _runner_scaling_gradients(module, 1.5), module)
    x, dout = harness.make_inputs(case, 1)[0]
    with pytest.raises(AssertionError, match="dx_l2"):
        checks.check_parity(case, impl, reference, x, dout)


def test_work_model_of_a_block():
    m, h = 1024, 64
    forward = cases.work(Case("cpu", "fp32", "forward", m, h, "fused"))
    train = cases.work(Case("cpu", "fp32", "train", m, h, "fused"))
    assert forward == (4 * m * h * h, 4 * (2 * m * h + 2 * h * h + 2 * h))
    assert train == (12 * m * h * h, 4 * (8 * m * h + 6 * h * h + 4 * h))
    flops, nbytes = cases.work(Case("cpu", "fp32", "forward", m, h, "fused", blocks=4))
    assert flops == 2 * m * h * h * 10 and nbytes is None


def test_saved_bytes_of_the_fused_block_do_not_exceed_the_reference():
    case = Case("cpu", "fp32", "train", 256, 32, "eager")
    reference = impls.build_reference(case)
    x, dout = harness.make_inputs(case, 1)[0]
    eager = checks.saved_tensor_bytes(impls.module_runner(reference, reference, "train"), reference, x, dout)
    fused = impls.build_impl(Case("cpu", "fp32", "train", 256, 32, "fused"), reference)
    saved = checks.saved_tensor_bytes(fused.run, fused.module, x, dout)
    assert 0 < saved["saved_activation_bytes"] <= eager["saved_activation_bytes"]
    assert saved["saved_bytes"] >= saved["saved_activation_bytes"]


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_smoke_run_records_what_the_report_reads(mode):
    case = Case("cpu", "fp32", mode, 32, 8, "fused")
    bench = FakeBenchmark()
    harness.run_case(case, bench, harness.Settings())
    info = bench.extra_info
    assert bench.calls == 1 and bench.group == case.group
    assert {"impl", "device", "device_name", "dtype", "mode", "kind", "rows", "width", "flops", "bytes"} <= set(info)
    assert info["parity_out"] <= checks.PARITY_TOLERANCE[("cpu", "fp32")][0]
    assert info["backend"] == "composite"  # the route auto takes on CPU below 4096 rows
    assert ("saved_activation_bytes" in info) == (mode == "train")


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_bare_gemm_and_addmm_activation_runners(mode):
    """CUDA-only in the suite; their math runs on any device, so check it here."""
    case = Case("cpu", "fp32", mode, 32, 8, "bare-gemm")
    reference = impls.build_reference(case)
    x, dout = harness.make_inputs(case, 1)[0]
    bare = impls.build_impl(case, reference)
    w1, w2 = reference.linear1.weight, reference.linear2.weight
    torch.testing.assert_close(bare.run(x, dout), (x @ w1.t()) @ w2.t())
    assert not bare.checks_parity and bare.module is None
    if mode == "forward":
        addmm = impls.build_impl(Case("cpu", "fp32", mode, 32, 8, "addmm-act"), reference)
        errors = checks.check_parity(case, addmm, reference, x, dout)
        assert errors["out"] <= checks.PARITY_TOLERANCE[("cpu", "fp32")][0]


def test_timed_run_records_rounds_and_the_paired_ratio():
    case = Case("cpu", "fp32", "forward", 16, 10, "fused")
    bench = FakeBenchmark()
    bench.enabled = True
    harness.run_case(case, bench, harness.Settings(seconds=0.05))
    info = bench.extra_info
    assert info["rounds"] >= clocks.MIN_ROUNDS and info["rotated_inputs"] > 1
    assert info["paired_rounds"] >= clocks.MIN_ROUNDS and info["paired_eager_over_impl"] > 0
    assert info["paired_ratio_q1"] <= info["paired_eager_over_impl"] <= info["paired_ratio_q3"]


def test_paired_timing_alternates_and_summarizes_the_per_pair_ratios():
    order = []

    def runner(name, per_call):
        def run(x, dout):
            order.append(name)
            time.sleep(per_call)
        return run

    inputs = [(torch.zeros(1), None)]
    paired = clocks.paired_timing(runner("eager", 0.002), runner("fused", 0.001), inputs, seconds=0.0)
    assert paired["paired_rounds"] == clocks.MIN_ROUNDS and len(order) == 2 * clocks.MIN_ROUNDS
    assert order[:4] == ["eager", "fused", "fused", "eager"]  # A B B A: neither side always goes first
    assert paired["paired_ratio_q1"] <= paired["paired_eager_over_impl"] <= paired["paired_ratio_q3"]


def test_quick_cpu_set_is_eager_and_fused_without_torch_compile():
    quick = [c for kind in ("block", "net", "ffn") for c in cases.select("quick", ["cpu"], kind)]
    assert {c.impl for c in quick} == {"eager", "fused"}
    assert {(c.rows, c.width) for c in quick if c.kind == "block"} == CPU_BENCHMARK_SHAPES
    assert {c.kind for c in quick} == {"block", "net", "ffn"} and len(quick) == 44


def test_progress_line_counts_cases_and_estimates_the_rest_at_the_pace_so_far():
    from benchmarks.conftest import progress_line

    assert progress_line(0, 52, 0.0) == "0 of 52 cases, 0s elapsed, ETA unknown"
    assert progress_line(13, 52, 65.0) == "13 of 52 cases, 1m05s elapsed, ETA 3m15s"


def test_environment_names_versions_and_commit(monkeypatch):
    monkeypatch.setattr(env_info, "_git", lambda *args: None)
    monkeypatch.setenv("FUSED_RESIDUAL_COMMIT", "abc123")
    env = env_info.environment()
    assert env["commit"] == "abc123" and env["dirty"] is None
    assert env["torch"] == torch.__version__ and env["date"].endswith("+00:00")


# -------------------------------------------------------------------- run order, commit, both clocks, compiled


def test_reduced_cuda_set_runs_the_measured_shapes_eager_and_fused_pairs_first():
    run = [c for kind in ("block", "net") for c in cases.select("reduced", ["cuda"], kind)]
    run.sort(key=cases.priority)
    first = run[:2 * 2 * len(cases.CUDA_MEASURED_SHAPES)]  # eager and fused, forward and training
    assert {(c.rows, c.width, c.dtype) for c in first} == set(cases.CUDA_MEASURED_SHAPES)
    assert {(c.impl, c.mode, c.kind) for c in first} == {(i, m, "block") for i in ("eager", "fused")
                                                         for m in ("forward", "train")}
    # Pairs side by side: eager just before fused of the same shape and mode.
    assert all(a.impl == "eager" and b.impl == "fused" and (a.rows, a.width, a.dtype, a.mode) ==
               (b.rows, b.width, b.dtype, b.mode) for a, b in zip(first[::2], first[1::2], strict=True))
    rest = run[len(first):]
    position = {c: i for i, c in enumerate(rest)}
    nets = [position[c] for c in rest if c.kind == "net" and c.impl in ("eager", "fused")]
    compiled = [position[c] for c in rest if c.impl in ("compile", "max-autotune", "reduce-overhead",
                                                         "fused-reduce-overhead")]
    extra_dtype = [position[c] for c in rest if c.dtype == "fp32"]
    assert max(nets) < min(compiled) and max(compiled) < min(extra_dtype)
    ro = [c for c in run if c.impl in ("reduce-overhead", "fused-reduce-overhead")]
    assert {c.width for c in ro} and max(c.width for c in ro) <= cases.RO_TARGET_MAX_WIDTH
    assert {c.mode for c in ro} == {"forward", "train"}


def test_collection_puts_benchmarks_in_priority_order_and_leaves_other_tests_in_place():
    from types import SimpleNamespace

    from benchmarks import conftest as bench_conftest

    def item(case):
        return SimpleNamespace(callspec=SimpleNamespace(params={"net_case" if case.blocks else "block_case": case}))

    net = Case("cpu", "fp32", "forward", 64, 32, "fused", blocks=4)
    compiled = Case("cpu", "fp32", "forward", 16, 10, "compile")
    eager, fused = Case("cpu", "fp32", "train", 16, 10, "eager"), Case("cpu", "fp32", "train", 16, 10, "fused")
    other = SimpleNamespace(name="a plain test")
    items = [item(compiled), other, item(net), item(fused), item(eager)]
    bench_conftest.pytest_collection_modifyitems(None, items)
    assert items[1] is other
    assert [bench_conftest.case_of(i) for i in items if i is not other] == [eager, fused, net, compiled]


def fake_git(answers: dict):
    return lambda *args: answers.get(args)


def test_commit_from_the_environment_wins_over_an_enclosing_repository(monkeypatch):
    enclosing = {("rev-parse", "--show-toplevel"): "/", ("rev-parse", "HEAD"): "e" * 40,
                 ("status", "--porcelain", "--untracked-files=no"): ""}
    monkeypatch.setattr(env_info, "_git", fake_git(enclosing))
    monkeypatch.delenv(env_info.COMMIT_ENV, raising=False)
    assert env_info.commit_info() == (None, None)  # git's answer is some other repository's
    monkeypatch.setenv(env_info.COMMIT_ENV, "abc1234")
    assert env_info.commit_info() == ("abc1234", None)
    ours = {**enclosing, ("rev-parse", "--show-toplevel"): str(env_info.ROOT)}
    monkeypatch.setattr(env_info, "_git", fake_git(ours))
    assert env_info.commit_info() == ("abc1234", None)  # this checkout is at another commit than named
    monkeypatch.setattr(env_info, "_git", fake_git({**ours, ("rev-parse", "HEAD"): "abc1234" + "0" * 33,
                                                   ("status", "--porcelain", "--untracked-files=no"): " M x.py"}))
    assert env_info.commit_info() == ("abc1234" + "0" * 33, True)
    monkeypatch.delenv(env_info.COMMIT_ENV)
    assert env_info.commit_info() == ("abc1234" + "0" * 33, True)


def test_host_time_is_per_call_and_does_not_wait_for_the_device():
    syncs = []

    def step():
        time.sleep(0.002)

    host = clocks.host_time(step, calls=5, synchronize=lambda: syncs.append(time.perf_counter()))
    assert len(syncs) == 2 and host["host_calls"] == 5
    assert 2.0 <= host["host_ms"] < 50.0  # ms per call, not per 5 calls or in seconds
    assert host["host_sync_ms"] >= host["host_ms"]


def profiler_event(name: str, device: str, start_us: float, end_us: float):
    """The parts of a torch.profiler FunctionEvent that device_time_summary reads (test data, no profiler run)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    return SimpleNamespace(name=name, device_type=DeviceType.CUDA if device == "cuda" else DeviceType.CPU,
                           time_range=SimpleNamespace(start=start_us, end=end_us))


def test_gpu_time_sums_device_activity_per_call_and_counts_kernels_and_launches():
    events = []
    for call in range(2):
        t = 100.0 * call
        events += [profiler_event("aten::addmm", "cpu", t, t + 40),  # host side: not GPU time
                   profiler_event("cudaLaunchKernel", "cpu", t + 1, t + 5),
                   profiler_event("cuLaunchKernelEx", "cpu", t + 6, t + 9),
                   profiler_event("Memset (Device)", "cuda", t + 10, t + 12),
                   profiler_event("whole_block_forward_kernel", "cuda", t + 12, t + 22),
                   profiler_event("sm90_xmma_gemm", "cuda", t + 22, t + 30)]
    summary = clocks.device_time_summary(events, calls=2)
    assert summary["gpu_ms"] == pytest.approx((2 + 10 + 8) * 1e-3)
    assert summary["kernels_per_call"] == 2 and summary["device_ops_per_call"] == 3
    assert summary["launch_calls_per_call"] == 2
    nothing = clocks.device_time_summary(events[:3], calls=2)
    assert nothing["gpu_ms"] is None and "no device activity" in nothing["gpu_note"]


def test_gpu_time_reads_real_profiler_events_and_never_reports_a_zero_gpu_clock():
    """On the CPU torch.profiler records host events only: the summary reads their real attributes and says it saw
    no device activity instead of a GPU time of 0."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            torch.mm(a, a)
    events = prof.events()
    assert any(e.name == "aten::mm" for e in events)
    summary = clocks.device_time_summary(events, calls=3)
    assert summary["gpu_ms"] is None and summary["kernels_per_call"] is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("impl, module_type", [("reduce-overhead", "ResidualBlock"),
                                                ("fused-reduce-overhead", "FusedResidualBlock")])
def test_reduce_overhead_variants_compile_the_reference_or_the_fused_block(impl, module_type):
    case = Case("cpu", "fp32", "forward", 32, 8, impl)
    reference = impls.build_reference(case)
    built = impls.build_impl(case, reference)  # torch.compile is lazy: nothing compiles here
    assert built.compiled and type(built.module).__name__ == module_type
    torch.testing.assert_close(built.module.state_dict(), reference.state_dict())


@pytest.mark.parametrize("args", [["--rows", "0"], ["--width", "abc"], ["--timeout", "-1"], ["--dtype", "int8"]])
def test_cold_start_rejects_bad_values_with_a_usage_error(args, capsys):
    from benchmarks import cold_start

    with pytest.raises(SystemExit) as stopped:
        cold_start.main(["--device", "cpu", *args])
    assert stopped.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_cold_start_takes_the_main_commands_dtype_spelling(monkeypatch):
    from benchmarks import cold_start

    seen = []
    monkeypatch.setattr(cold_start, "measure", lambda device, dtype, *rest: seen.append(dtype) or [])
    assert cold_start.main(["--device", "cpu", "--dtype", "float32"]) == 0
    assert seen == ["fp32"]
