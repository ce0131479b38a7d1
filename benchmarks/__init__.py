"""The benchmark suite of fused_residual (pytest-benchmark), its report and the GPU check script.

- ``pytest benchmarks --benchmark-only`` times; a plain ``pytest`` runs every case once as a smoke test.
- ``python -m benchmarks.report RESULTS.json [...]`` turns pytest-benchmark JSON into a markdown table and plots.
- ``benchmarks/gpu_check.sh OUTDIR`` runs tests, benchmarks and the report on a CUDA machine.

See ``benchmarks/README.md``.
"""
