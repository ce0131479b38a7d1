"""The benchmark report: ratios, bandwidth and FLOP fractions, summaries and plots from known synthetic results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import analysis, plots, report  # noqa: E402

CEILINGS = {"copy_GBps": 2000.0, "matmul_TFLOPs": {"bf16": 800.0, "fp16": 800.0, "fp32": 50.0}, "matmul_n": 8192}


def bench(impl: str, median_ms: float, *, device: str = "cpu", device_name: str = "Test CPU", dtype: str = "fp32",
          mode: str = "forward", rows: int = 1024, width: int = 64, blocks: int = 0, **extra) -> dict:
    """One benchmark entry shaped like pytest-benchmark's JSON, with the extra_info the harness writes."""
    info = {"impl": impl, "device": device, "device_name": device_name, "dtype": dtype, "mode": mode,
            "kind": "net" if blocks else "block", "rows": rows, "width": width, "blocks": blocks, **extra}
    return {"group": f"{device} {dtype} {mode}", "name": f"test[{impl}]", "extra_info": info,
            "stats": {"median": median_ms * 1e-3, "rounds": 10}}


def write_results(path: Path, benchmarks: list[dict], ceilings: dict | None = None) -> Path:
    machine = {"fused_residual": {"date": "2030-01-02T03:04:05+00:00", "commit": "0123456789abcdef", "dirty": False,
                                  "torch": "2.13.0", "triton": "3.9.0", "shape_set": "reduced", "torch_threads": 2,
                                  "ceilings": {"cuda": ceilings} if ceilings else {}}}
    path.write_text(json.dumps({"machine_info": machine, "commit_info": {"id": "0123456789abcdef"},
                                "benchmarks": benchmarks, "datetime": "2030-01-02", "version": "5.2.3"}))
    return path


def only_row(sections: list[report.Section]) -> report.Row:
    assert len(sections) == 1 and len(sections[0].rows) == 1
    return next(iter(sections[0].rows.values()))


def test_ratios_are_time_over_time_from_the_pytest_medians(tmp_path):
    path = write_results(tmp_path / "r.json", [bench("eager", 2.0), bench("compile", 3.0), bench("fused", 1.0),
                                               bench("bare-gemm", 0.5)])
    sections = report.load([path])
    timer = report.section_timer(sections[0], "auto")
    assert timer == "pytest"
    ratios = report.ratios(only_row(sections), timer)
    assert ratios["eager/fused"] == pytest.approx(2.0)
    assert ratios["compile/fused"] == pytest.approx(3.0)
    assert ratios["fused/bare-gemm"] == pytest.approx(2.0)
    assert ratios["max-autotune/fused"] is None and ratios["addmm-act/fused"] is None


def test_do_bench_medians_are_used_on_cuda_when_every_result_has_them(tmp_path):
    cuda = {"device": "cuda", "device_name": "Test GPU", "dtype": "bf16"}
    path = write_results(tmp_path / "r.json", [bench("eager", 9.0, do_bench_ms=3.0, **cuda),
                                               bench("fused", 9.0, do_bench_ms=1.5, **cuda)])
    section = report.load([path])[0]
    assert report.section_timer(section, "auto") == "do_bench"
    assert report.ratios(only_row([section]), "do_bench")["eager/fused"] == pytest.approx(2.0)
    assert report.ratios(only_row([section]), "pytest")["eager/fused"] == pytest.approx(1.0)


def test_bandwidth_and_flops_are_fractions_of_the_ceilings_measured_in_the_run(tmp_path):
    cuda = {"device": "cuda", "device_name": "Test GPU", "dtype": "bf16"}
    fused = bench("fused", 5.0, do_bench_ms=1.0, bytes=10**9, flops=4 * 10**11, **cuda)  # 1 ms
    path = write_results(tmp_path / "r.json", [bench("eager", 5.0, do_bench_ms=2.0, **cuda), fused], CEILINGS)
    section = report.load([path])[0]
    achieved = report.achieved(section, only_row([section]), "do_bench")
    assert achieved["GBps"] == pytest.approx(1000.0)  # 1e9 bytes in 1 ms
    assert achieved["GBps_frac"] == pytest.approx(0.5)  # of the 2000 GB/s copy
    assert achieved["TFLOPs"] == pytest.approx(400.0)
    assert achieved["TFLOPs_frac"] == pytest.approx(0.5)  # of the 800 TFLOP/s bf16 matmul
    markdown = report.render([section], "auto", {})
    assert "1000 (50%)" in markdown and "400.0 (50%)" in markdown and "copy 2000 GB/s" in markdown


def test_ceilings_in_extra_info_win_over_machine_info(tmp_path):
    cuda = {"device": "cuda", "device_name": "Test GPU", "dtype": "fp32"}
    own = {"copy_GBps": 1000.0, "matmul_TFLOPs": {"fp32": 20.0}}
    fused = bench("fused", 1.0, bytes=10**9, flops=10**10, ceilings=own, **cuda)
    section = report.load([write_results(tmp_path / "r.json", [fused], CEILINGS)])[0]
    achieved = report.achieved(section, only_row([section]), "pytest")
    assert achieved["GBps_frac"] == pytest.approx(1.0)
    assert achieved["TFLOPs_frac"] == pytest.approx(0.5)


def test_summary_geomean_min_and_the_cpu_target(tmp_path):
    results = [bench("eager", 1.0, width=64), bench("fused", 1.0, width=64),
               bench("eager", 4.0, width=128), bench("fused", 1.0, width=128)]
    section = report.load([write_results(tmp_path / "r.json", results)])[0]
    (line,) = report.summary(section, "pytest")
    assert line["shapes"] == 2
    assert line["geomean eager/fused"] == pytest.approx(2.0)  # sqrt(1 * 4)
    assert line["min eager/fused"] == pytest.approx(1.0)
    assert "eager/fused: met" in report.cpu_target(section, "pytest")
    results[1] = bench("fused", 1.1, width=64)  # 0.91x on one shape
    section = report.load([write_results(tmp_path / "r.json", results)])[0]
    assert "eager/fused: NOT met" in report.cpu_target(section, "pytest")


def test_geomean_ignores_missing_values():
    assert report.geomean([2.0, None, 8.0]) == pytest.approx(4.0)
    assert report.geomean([None]) is None
    assert math.isclose(report.geomean([3.0]), 3.0)


def test_cpu_and_gpu_results_get_separate_sections_and_plots(tmp_path, capsys):
    cuda = {"device": "cuda", "device_name": "Test GPU", "dtype": "bf16"}
    cpu_file = write_results(tmp_path / "cpu.json", [bench("eager", 2.0, width=w) for w in (32, 64)]
                             + [bench("fused", 1.0, width=w) for w in (32, 64)]
                             + [bench("eager", 3.0, mode="train", blocks=4, saved_activation_bytes=3 << 20),
                                bench("fused", 2.0, mode="train", blocks=4, saved_activation_bytes=2 << 20)])
    gpu_file = write_results(tmp_path / "gpu.json", [bench("eager", 2.0, width=w, rows=r, **cuda)
                                                     for w in (32, 64) for r in (1024, 4096)]
                             + [bench("fused", 0.5, width=w, rows=r, **cuda) for w in (32, 64) for r in (1024, 4096)],
                             CEILINGS)
    out = tmp_path / "out"
    assert report.main([str(cpu_file), str(gpu_file), "-o", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown.count("\n## ") == 2
    cpu_part, gpu_part = markdown.split("## cuda: Test GPU")
    assert "## cpu: Test CPU" in cpu_part and "Test GPU" not in cpu_part
    assert "2.00x" in cpu_part and "4.00x" in gpu_part
    assert "| 3.0 MiB | 2.0 MiB | 0.67x |" in cpu_part  # saved activations of the net's training step
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["speedup-cpu-test-cpu-block-fp32.png", "speedup-cpu-test-cpu-net-fp32.png",
                    "speedup-cuda-test-gpu-block-bf16.png"]
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert all(f"]({name})" in markdown for name in pngs)
    printed = capsys.readouterr().out
    assert "cpu: Test CPU" in printed and "cuda: Test GPU" in printed


def test_main_rejects_missing_files_and_foreign_json(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": {}, "stats": {"median": 1.0}}]}))
    with pytest.raises(SystemExit):
        report.main([str(foreign)])


def test_stat_option_picks_the_pytest_benchmark_statistic(tmp_path):
    eager, fused = bench("eager", 2.0), bench("fused", 1.0)
    eager["stats"]["min"] = fused["stats"]["min"] = 1e-3
    path = write_results(tmp_path / "r.json", [eager, fused])
    assert report.ratios(only_row(report.load([path])), "pytest")["eager/fused"] == pytest.approx(2.0)
    assert report.ratios(only_row(report.load([path], "min")), "pytest")["eager/fused"] == pytest.approx(1.0)
    assert "pytest-benchmark min" in report.render(report.load([path], "min"), "auto", {})


def test_paired_ratio_is_reported_and_judged_beside_the_separate_one(tmp_path):
    results = [bench("eager", 1.2, width=64), bench("fused", 1.0, width=64, paired_eager_over_impl=1.1),
               bench("eager", 1.0, width=128), bench("fused", 1.0, width=128, paired_eager_over_impl=0.9)]
    section = report.load([write_results(tmp_path / "r.json", results)])[0]
    rows = [section.rows[k] for k in sorted(section.rows)]
    assert [report.ratios(r, "pytest")[report.PAIRED] for r in rows] == [1.1, 0.9]
    (line,) = report.summary(section, "pytest")
    assert line[f"min {report.PAIRED}"] == pytest.approx(0.9) and line["flagged"] == 0
    assert line[f"geomean {report.PAIRED}"] == pytest.approx((1.1 * 0.9) ** 0.5)
    target = report.cpu_target(section, "pytest")
    # separately min 1.0x, geomean 1.095x: met; paired min 0.9x: not met.
    assert "eager/fused: met" in target and f"{report.PAIRED}: NOT met" in target
    assert "| eager/fused | eager/fused paired |" in report.render([section], "auto", {})


def test_a_case_whose_paired_and_separate_ratios_disagree_is_flagged_and_not_counted(tmp_path):
    # Made-up test data: one case whose separate ratio (8.09x) is far from its paired one (1.17x).
    results = [bench("eager", 8.09, width=64), bench("fused", 1.0, width=64, paired_eager_over_impl=1.17),
               bench("eager", 1.10, width=128), bench("fused", 1.0, width=128, paired_eager_over_impl=1.0)]
    section = report.load([write_results(tmp_path / "r.json", results)])[0]
    (line,) = report.summary(section, "pytest")
    assert line["flagged"] == 1 and line["shapes"] == 1
    assert line["geomean eager/fused"] == pytest.approx(1.10) and line[f"geomean {report.PAIRED}"] == 1.0
    assert "1 flagged shape-mode(s) not counted" in report.cpu_target(section, "pytest")
    markdown = report.render([section], "auto", {})
    assert "### Flagged, not counted" in markdown
    assert "- block 1024 x 64 fp32 forward: paired 1.17x vs separate 8.09x" in markdown
    assert markdown.count("flagged, not counted") == 1  # the table's note column, on that row only


def test_ratios_carry_the_interquartile_range_and_the_rounds(tmp_path):
    eager, fused = bench("eager", 2.0), bench("fused", 1.0, paired_eager_over_impl=1.9, paired_ratio_q1=1.8,
                                                            paired_ratio_q3=2.1, paired_rounds=400)
    eager["stats"].update(q1=1.8e-3, q3=2.4e-3, rounds=500)
    fused["stats"].update(q1=0.9e-3, q3=1.2e-3, rounds=600)
    section = report.load([write_results(tmp_path / "r.json", [eager, fused])])[0]
    row = only_row([section])
    spread = analysis.ratio_spread(row, "eager", "fused", "pytest")
    assert spread.value == pytest.approx(2.0) and spread.rounds == 500
    assert spread.q1 == pytest.approx(1.8 / 1.2) and spread.q3 == pytest.approx(2.4 / 0.9)
    markdown = report.render([section], "auto", {})
    assert "| 2.00x (1.50-2.67) | 1.90x (1.80-2.10) | 500 / 600 / 400 |" in markdown


def test_the_first_gpu_runs_blocks_json_renders_with_its_own_geomeans(tmp_path):
    path = ROOT / "benchmarks" / "results" / "h200-2026-11-26-44834e3" / "blocks.json"
    recorded = json.loads(path.read_text())
    (section,) = report.load([path])
    assert section.device_name == "NVIDIA H200" and len(section.rows) == 2 * len(recorded["cases"])
    assert section.sources[0]["commit"] == "44834e3" and section.sources[0]["date"] == "2026-11-26"
    forward = [report.ratio(r, "eager", "fused", "do_bench") for r in section.rows.values() if r.mode == "forward"]
    train = [report.ratio(r, "eager", "fused", "do_bench") for r in section.rows.values() if r.mode == "train"]
    assert report.geomean(forward) == pytest.approx(recorded["geomean_fwd"])
    assert report.geomean(train) == pytest.approx(recorded["geomean_train"])
    assert report.main([str(path), "-o", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["speedup-cuda-nvidia-h200-block-bf16.png",
                                                             "speedup-cuda-nvidia-h200-block-fp16.png"]
    assert "recorded no spread and no round counts" in (tmp_path / "report.md").read_text()


def test_ffn_and_net_results_get_plots_with_each_mode_captioned(tmp_path):
    results = [bench(impl, t, mode=mode, **kind) for impl, t in (("eager", 2.0), ("fused", 1.0))
               for mode in ("forward", "train", "train-sum") for kind in ({}, {"blocks": 4})]
    ffn = [bench(impl, t, kind="ffn") for impl, t in (("eager", 2.0), ("fused", 1.0))]
    for entry in ffn:
        entry["extra_info"]["kind"] = "ffn"
    section = report.load([write_results(tmp_path / "r.json", results + ffn)])[0]
    figures = plots.plot(section, "pytest", tmp_path)
    assert [name for name, _ in figures] == ["speedup-cpu-test-cpu-block-fp32.png",
                                             "speedup-cpu-test-cpu-ffn-fp32.png", "speedup-cpu-test-cpu-net-fp32.png"]
    block_caption = figures[0][1]
    assert "train-sum: a training step with the loss y.sum()" in block_caption
    assert "A point without a bar: this run recorded no spread" in block_caption  # these entries have no q1/q3


# ------------------------------------------------------------------ JSON lines, both clocks, targets, cold start
# Every number below is made-up test data for the report's arithmetic, not a measurement.

CUDA = {"device": "cuda", "device_name": "Test GPU", "dtype": "bf16"}


def clocks(wall_ms: float, host_ms: float, gpu_ms: float, kernels: float) -> dict:
    """The CUDA clocks harness.run_case records in extra_info."""
    return {"do_bench_ms": wall_ms, "host_ms": host_ms, "gpu_ms": gpu_ms, "kernels_per_call": kernels}


def line(entry: dict, outcome: str = "passed", message: str | None = None) -> dict:
    """A ``benchmark`` JSON line (records.py) from a pytest-benchmark-shaped entry."""
    info = entry["extra_info"]
    case_id = (f"{info['device']}-{info['dtype']}-{info['mode']}-{info['kind']}-{info['rows']}x{info['width']}-"
               f"{info['impl']}")
    return {"type": "benchmark", "id": case_id, "outcome": outcome, "message": message, **entry}


def session(planned: list[str]) -> dict:
    return {"type": "session", "shape_set": "reduced", "timing": True, "planned": planned,
            "fused_residual": {"date": "2030-01-02T03:04:05+00:00", "commit": "fedcba9876543210", "dirty": False,
                               "torch": "2.11.0", "triton": "3.6.0"}}


def write_lines(path: Path, lines: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)
    return path


def test_json_lines_of_a_stopped_run_are_reported_with_what_finished(tmp_path):
    eager = line(bench("eager", 9.0, rows=65536, width=64, **CUDA, **clocks(0.2, 0.1, 0.05, 3)))
    fused = line(bench("fused", 9.0, rows=65536, width=64, **CUDA, **clocks(0.1, 0.2, 0.025, 1)))
    failed = line(bench("eager", 9.0, rows=65536, width=128, mode="train", **CUDA), "failed",
                  "AssertionError: differs from the eager reference")
    planned = [eager["id"], fused["id"], failed["id"], "cuda-bf16-train-block-65536x128-fused"]
    # The last line was cut short by a kill in the middle of a write.
    path = write_lines(tmp_path / "bench.jsonl", [session(planned), eager, fused, failed],
                       tail='{"type": "benchmark", "id": "cuda-bf16-tr')
    (section,) = report.load([path])
    assert report.section_timer(section, "auto") == "do_bench"
    row = only_row([section])
    assert report.ratios(row, "do_bench")["eager/fused"] == pytest.approx(2.0)
    assert report.ratio(row, "eager", "fused", "host") == pytest.approx(0.5)
    assert report.ratio(row, "eager", "fused", "gpu") == pytest.approx(2.0)
    assert [u["id"] for u in section.unmeasured] == [failed["id"]]
    (source,) = section.sources
    assert source["commit"] == "fedcba9876543210" and source["unreadable_lines"] == 1
    markdown = report.render([section], "auto", {})
    assert "3 of 4 planned cases finished (the run stopped before the rest)" in markdown
    assert "1 unreadable line(s) skipped" in markdown
    assert f"`{failed['id']}`: failed: AssertionError" in markdown


def test_both_clocks_side_by_side_with_a_ratio_each(tmp_path, capsys):
    results = [bench("eager", 9.0, rows=65536, width=64, **CUDA, **clocks(0.2, 0.1, 0.05, 3)),
               bench("fused", 9.0, rows=65536, width=64, bytes=10**6, flops=10**9, **CUDA,
                     **clocks(0.1, 0.2, 0.025, 1)),
               bench("reduce-overhead", 9.0, rows=65536, width=64, **CUDA, **clocks(0.06, 0.01, 0.05, 3)),
               bench("fused-reduce-overhead", 9.0, rows=65536, width=64, cudagraph_skips=1, **CUDA,
                     **clocks(0.04, 0.01, 0.025, 1))]
    section = report.load([write_results(tmp_path / "r.json", results)])[0]  # pytest-benchmark JSON still reads
    markdown = report.render([section], "auto", {})
    # wall 200/100 us, host 100/200 us, GPU 50/25 us; fused moves 1e6 bytes and 1e9 FLOPs in 25 us of GPU time.
    assert ("| 65536 x 64 | bf16 | forward | 200.0 | 100.0 | 2.00x | 100.0 | 200.0 | 0.50x | 50.0 | 25.0 | 2.00x "
            "| 3 | 1 | 40 / 40.0 |") in markdown
    assert "Both clocks, both under torch.compile(mode=\"reduce-overhead\")" in markdown
    assert "| 60.0 | 40.0 | 1.50x |" in markdown
    assert "fused-reduce-overhead: Inductor skipped CUDA graphs" in markdown
    assert report.ratios(only_row([section]), "do_bench")[report.RO] == pytest.approx(1.5)
    report.print_summary([section], "auto")
    printed = capsys.readouterr().out.strip().splitlines()
    # The compact table of both clocks comes last.
    assert printed[-1] == ("| 65536 x 64 | bf16 | forward | 200.0 / 100.0 | 2.00x | 100.0 / 200.0 | 0.50x "
                           "| 50.0 / 25.0 | 2.00x | 3 / 1 | 1.50x |")


def test_cpu_reports_have_no_clock_tables(tmp_path):
    path = write_results(tmp_path / "r.json", [bench("eager", 2.0), bench("fused", 1.0)])
    markdown = report.render(report.load([path]), "auto", {})
    assert "Both clocks" not in markdown and "Targets" not in markdown


def measured_results(speedup: float, ro_speedup: float | None = None) -> list[dict]:
    """eager and fused at every block shape of the measurement file, both modes, fused `speedup` x faster."""
    from benchmarks.cases import CUDA_MEASURED_SHAPES

    results = []
    for rows, width, dtype in CUDA_MEASURED_SHAPES:
        for mode in ("forward", "train"):
            shape = {"rows": rows, "width": width, "mode": mode, "device": "cuda", "device_name": "Test GPU",
                     "dtype": dtype}
            results += [bench("eager", 1.0, **shape, **clocks(1.0, 0.5, 0.8, 4)),
                        bench("fused", 1.0, **shape, **clocks(1.0 / speedup, 0.25, 0.4, 1))]
            if ro_speedup is not None and width <= 256:
                results += [bench("reduce-overhead", 1.0, **shape, **clocks(0.9, 0.1, 0.8, 4)),
                            bench("fused-reduce-overhead", 1.0, **shape, **clocks(0.9 / ro_speedup, 0.1, 0.4, 1))]
    return results


def test_gpu_targets_are_judged_on_the_first_gpu_runs_shapes(tmp_path):
    section = report.load([write_results(tmp_path / "r.json", measured_results(3.0, ro_speedup=1.25))])[0]
    targets = "\n".join(report.cuda_targets(section))
    assert "8 of the 8 block shapes" in targets
    assert "NOT met" not in targets and targets.count("**met**") == 7
    section = report.load([write_results(tmp_path / "r.json", measured_results(1.4, ro_speedup=1.1))])[0]
    targets = report.cuda_targets(section)
    verdict = {t.split(":")[0]: "NOT met" not in t for t in targets[2:]}
    assert verdict == {"- fused >= 1.0x eager at every shape, forward and training": True,
                       "- forward geomean >= 1.5x": False, "- training step geomean >= 1.3x": True,
                       "- whole-block widths (<= 128) forward >= 2.5x": False,
                       "- both under reduce-overhead, widths <= 256": False,
                       "- host time, forward": True, "- host time, training step": True}


def test_cold_start_records_get_a_table_and_the_h100_target(tmp_path):
    def cold(cache: str, first: float) -> dict:
        return {"type": "cold_start", "cache": cache, "device": "cuda", "device_name": "Test GPU", "dtype": "bf16",
                "rows": 16384, "width": 256, "backend": "triton", "backend_used": "triton", "outcome": "passed",
                "message": None, "import_s": 2.0, "first_step_s": first, "second_step_s": 0.001, "process_s": 9.0,
                "cache_kernels": 12}

    path = write_lines(tmp_path / "cold.jsonl", [cold("empty", 12.5), cold("warm", 3.25)])
    (section,) = report.load([path])
    assert not section.rows and len(section.cold_start) == 2
    markdown = report.render([section], "auto", {})
    assert "| 16384 x 256 | bf16 | triton | empty | 12.50 | 0.0010 | 9.0 | 2.00 | 12 | passed |" in markdown
    assert "**met** (at most 12.50 s) (measured on Test GPU, not an H100)" in markdown
    path = write_lines(tmp_path / "cold.jsonl", [cold("empty", 25.0)])
    assert "**NOT met**" in report.render(report.load([path]), "auto", {})
    assert report.main([str(path), "-o", str(tmp_path / "out"), "--no-plots"]) == 0
