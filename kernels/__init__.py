"""Triton kernels of fused_residual, installed as ``fused_residual.kernels``.

One kernel family per file, each with a docstring giving the math, shapes, bytes moved, FLOPs and launch grid.
Importing this package needs triton; ``fused_residual`` itself imports it only when the Triton backend runs.
"""
