"""The benchmark suite of fused_residual (pytest-benchmark), its report, the cold start and the GPU check script.

- ``pytest benchmarks --benchmark-only`` times; a plain ``pytest`` runs every case once as a smoke test;
  ``--bench-jsonl PATH`` writes a JSON line per finished case (``records.py``), so a stopped run keeps them.
- ``python -m benchmarks.cold_start``: the first forward + backward at a new width, empty and warm Triton cache.
- ``python -m benchmarks.report RESULTS [...]`` turns pytest-benchmark JSON or JSON lines into markdown and plots.
- ``python -m benchmarks.host_time``: host time of a cached call, fused vs eager, on any CPU (the GPU stubbed:
  ``fake_gpu.py``); ``host_counts.py``: deterministic counts of a call (Python calls, launches, allocations).
- ``benchmarks/gpu_check.sh OUTDIR`` runs tests, benchmarks, the cold start, the report and the host-time
  benchmark on a CUDA machine.

See ``benchmarks/README.md``.
"""
