"""The recorded launches (``kernels/_plan_launches.py``) are the kernel wrappers' launches: the same kernels, grids,
arguments and keywords, launch by launch (a kernel constexpr added to a wrapper but not to its recorded launch
fails here)."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_INSTALLED

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")


def recorded_launches(monkeypatch, fn, inputs: dict) -> list:
    """The launches ``fn()`` makes, each as (kernel, grid, arguments, keywords) with every tensor named: an
    input's name (by data pointer), else ("new", shape, strides, dtype)."""
    from fused_residual.kernels import _launch

    names = {t.data_ptr(): name for name, t in inputs.items() if t is not None}
    seen = []
    original = _launch.CachedLauncher.__call__

    def recording(self, grid, *args, **kwargs):
        seen.append((self.name, grid, args, kwargs))
        return original(self, grid, *args, **kwargs)

    monkeypatch.setattr(_launch.CachedLauncher, "__call__", recording)
    fn()
    monkeypatch.setattr(_launch.CachedLauncher, "__call__", original)

    def name(a):
        if isinstance(a, torch.Tensor):
            return names.get(a.data_ptr(), ("new", tuple(a.shape), a.stride(), a.dtype))
        return a

    def dims(grid, kwargs):  # Triton launches missing grid dims as 1
        grid = tuple(grid(kwargs)) if callable(grid) else tuple(grid)
        return grid + (1,) * (3 - len(grid))

    return [(kernel, dims(grid, kwargs), tuple(map(name, args)), kwargs) for kernel, grid, args, kwargs in seen]


def _fused_linear_cases(t):
    """(wrapper call, recorder call) pairs of the launches the Triton backend makes."""
    from fused_residual.kernels import _plan_launches as pl
    from fused_residual.kernels import fused_linear as fl
    from fused_residual.kernels._plan import RowsKey

    return {
        "bias_activation": (lambda: fl.fused_linear(t["x"], t["w1"].t(), bias=t["b1"], activation="relu"),
                            lambda rec: pl.fused_linear(rec, "c", "x", ("w1", True), bias="b1", activation="relu")),
        "pre_out_gelu": (lambda: fl.fused_linear(t["x"], t["w1"].t(), bias=t["b1"], activation="gelu",
                                                 pre_out=t["pre"]),
                         lambda rec: pl.fused_linear(rec, "c", "x", ("w1", True), bias="b1", activation="gelu",
                                                        pre_out="pre")),
        "residual": (lambda: fl.fused_linear(t["h"], t["w2"].t(), bias=t["b2"], residual=t["x"], activation="relu"),
                     lambda rec: pl.fused_linear(rec, "c", "h", ("w2", True), bias="b2", residual="x",
                                                    activation="relu")),
        "second": (lambda: fl.fused_linear(t["h"], t["w2"].t(), second=(t["x"], t["ws"].t()), bias=t["b2"]),
                   lambda rec: pl.fused_linear(rec, "c", "h", ("w2", True), second=("x", ("ws", True)),
                                                  bias="b2")),
        "gate": (lambda: fl.fused_linear(t["dout"], t["w2"], relu_mask=t["out"], gate=t["h"]),
                 lambda rec: pl.fused_linear(rec, "c", "dout", "w2", relu_mask="out", gate="h")),
        "mask_on_residual": (lambda: fl.fused_linear(t["h"], t["w1"], residual=t["dout"], relu_mask=t["out"],
                                                     mask_on="residual"),
                             lambda rec: pl.fused_linear(rec, "c", "h", "w1", residual="dout", relu_mask="out",
                                                            mask_on="residual")),
        "weight_grad_split_k": (lambda: fl.fused_linear(t["dout"].t(), t["h"], relu_mask=t["out"].t(), rowsum=True,
                                                        split_k=3, b_activation="gelu"),
                                lambda rec: pl.fused_linear(rec, "c", ("dout", True), "h", rows_in="k",
                                                               relu_mask=("out", True), rowsum="sums",
                                                               split_k=RowsKey(0, 1, 3), b_activation="gelu")),
    }


@pytest.mark.parametrize("case", ["bias_activation", "pre_out_gelu", "residual", "second", "gate",
                                  "mask_on_residual", "weight_grad_split_k"])
def test_recorded_fused_linear_launches_are_the_wrappers(monkeypatch, case):
    from fused_residual.kernels._plan import Recorder

    torch.manual_seed(0)
    t = {name: torch.randn(*shape) for name, shape in (
        ("x", (40, 24)), ("w1", (24, 24)), ("b1", (24,)), ("w2", (24, 24)), ("b2", (24,)), ("ws", (24, 24)),
        ("h", (40, 24)), ("pre", (40, 24)), ("dout", (40, 24)), ("out", (40, 24)))}
    wrapper, record = _fused_linear_cases(t)[case]
    expected = recorded_launches(monkeypatch, wrapper, t)
    actual = recorded_launches(monkeypatch, lambda: record(Recorder(dict(t), t["x"].device)), t)
    assert actual == expected and len(actual) == 1


@pytest.mark.parametrize("need_dx,need_weights", [(True, True), (True, False), (False, True)])
def test_recorded_whole_block_launches_are_the_wrappers(monkeypatch, need_dx, need_weights):
    from fused_residual.kernels import _plan_launches as pl
    from fused_residual.kernels import whole_block as wb
    from fused_residual.kernels._plan import Recorder

    torch.manual_seed(0)
    t = {name: torch.randn(*shape) for name, shape in (
        ("x", (40, 24)), ("w1", (24, 24)), ("b1", (24,)), ("w2", (24, 24)), ("b2", (24,)), ("dout", (40, 24)),
        ("out", (40, 24)), ("saved", (40, 24)))}
    expected = recorded_launches(monkeypatch, lambda: wb.forward(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                                                 store_saved=True, out_dtype=torch.float32), t)
    actual = recorded_launches(monkeypatch, lambda: pl.whole_block_forward(
        Recorder(dict(t), t["x"].device), "o", "s", "x", "w1", "b1", "w2", "b2", activation="relu",
        final_relu=True, out_dtype=torch.float32), t)
    assert actual == expected
    expected = recorded_launches(monkeypatch, lambda: wb.backward(
        t["dout"], t["out"], t["saved"], t["x"], t["w1"], t["w2"], need_dx=need_dx, need_weights=need_weights,
        dx_dtype=torch.float32), t)
    actual = recorded_launches(monkeypatch, lambda: pl.whole_block_backward(
        Recorder(dict(t), t["x"].device), "dout", "out", "saved", "x", "w1", "w2", need_dx=need_dx,
        need_weights=need_weights, activation="relu", final_relu=True, dx_dtype=torch.float32), t)
    assert actual == expected and len(actual) == 1
