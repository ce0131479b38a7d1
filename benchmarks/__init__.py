"""The benchmark suite of fused_residual (pytest-benchmark), its report, the cold start and the GPU check script.

- ``pytest benchmarks --benchmark-only`` times; a plain ``pytest`` runs every case once as a smoke test;
  ``--bench-jsonl PATH`` writes a JSON line per finished case (``records.py``), so a stopped run keeps them.
- ``python -m benchmarks.cold_start``: the first forward + backward at a new width, empty and warm Triton cache.
- ``python -m benchmarks.report RESULTS [...]`` turns pytest-benchmark JSON or JSON lines into markdown and plots.
- ``benchmarks/gpu_check.sh OUTDIR`` runs tests, benchmarks, the cold start and the report on a CUDA machine.

See ``benchmarks/README.md``.
"""
