"""Triton kernels of fused_residual, installed as ``fused_residual.kernels``.

One idea per file: a kernel (``*_kernel.py``, ``whole_block_forward.py``, ``whole_block_backward.py``,
``whole_net.py``), each with a docstring giving the math, shapes, bytes moved, FLOPs and launch grid; its configs
and their pruning (``*_configs.py``, plain Python: no triton); its host wrapper and autotuner (``fused_linear.py``,
``whole_block.py``). Device facts are read in ``_common.py`` only. Importing a kernel or wrapper needs triton;
``fused_residual`` itself imports it only when the Triton backend runs.
"""
