"""The counting helpers of ``benchmarks/host_counts.py`` on small cases whose counts are known by construction."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

import fused_residual as fr  # noqa: E402
from benchmarks import host_counts  # noqa: E402
from fused_residual import backends  # noqa: E402

MODULE = '''
def leaf(items):
    return len(items)


def two_leaves(items):
    return leaf(items) + leaf(items)


def with_comprehension(items):
    squares = [i * i for i in items]
    return leaf(squares)


def with_loop(items):
    squares = []
    for i in items:
        squares.append(i * i)
    return leaf(squares)


def generator(n):
    for i in range(n):
        yield i


def consume(n):
    total = 0
    for i in generator(n):
        total += i
    return total
'''


@pytest.fixture
def counted_module(tmp_path, monkeypatch):
    """A module in a folder that counts as the package's."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "sample.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(host_counts, "package_folders", lambda: (str(folder.resolve()) + "/",))
    sys.modules.pop("sample", None)
    module = importlib.import_module("sample")
    yield module
    sys.modules.pop("sample", None)


def test_counts_each_python_frame_and_c_call(counted_module):
    result, calls = host_counts.count_calls(lambda: counted_module.two_leaves([1, 2, 3]))
    assert result == 6
    # the lambda (not the package's), two_leaves, leaf, leaf; len twice
    assert (calls.python, calls.package, calls.c) == (4, 3, 2)
    assert calls.by_function == {"pkg/sample.py:leaf": 2, "pkg/sample.py:two_leaves": 1}
    assert calls.python_meta == 0


def test_a_list_comprehension_counts_like_the_loop_it_replaces(counted_module):
    """Python 3.12 runs comprehensions inline: they are not counted on any version."""
    _, comprehension = host_counts.count_calls(lambda: counted_module.with_comprehension(range(5)))
    _, loop = host_counts.count_calls(lambda: counted_module.with_loop(range(5)))
    assert comprehension.package == loop.package == 2
    assert comprehension.python == loop.python == 3
    assert loop.c == comprehension.c + 5  # append per item (len and the rest alike)


def test_a_generator_counts_each_resumption(counted_module):
    _, calls = host_counts.count_calls(lambda: counted_module.consume(3))
    # consume, then the generator entered once and resumed after each of its 3 values
    assert calls.by_function == {"pkg/sample.py:generator": 4, "pkg/sample.py:consume": 1}


def test_the_package_folders_are_fused_residual_and_kernels():
    block = fr.ResidualBlock(4, 4).to("meta")
    x = torch.empty(3, 4, device="meta")
    block(x)
    _, calls = host_counts.count_calls(lambda: block(x))
    assert calls.by_function == {"fused_residual/reference.py:ResidualBlock.forward": 1}
    assert calls.python > 5  # nn.Module's call path, Linear.forward, ReLU.forward, ...
    if backends.missing_requirement("triton") is None:
        from fused_residual.kernels import _launch

        _, calls = host_counts.count_calls(_launch.launch_counts)
        assert calls.by_function == {"kernels/_launch.py:launch_counts": 1}


def test_python_meta_kernels_are_seen():
    """An addmm on meta tensors runs PyTorch's Python meta kernel (unless it was unregistered); on CPU it does not."""
    args = [torch.empty(8), torch.empty(4, 8), torch.empty(8, 8)]
    torch.addmm(*args)
    _, cpu = host_counts.count_calls(lambda: torch.addmm(*args))
    meta_args = [t.to("meta") for t in args]
    torch.addmm(*meta_args)
    _, meta = host_counts.count_calls(lambda: torch.addmm(*meta_args))
    assert cpu.python_meta == 0
    assert meta.python_meta > 0


@pytest.mark.parametrize(("name", "fn", "ops", "launches", "allocations"), [
    ("factory", lambda a: torch.empty(3), {"empty": 1}, {}, 1),
    ("fill", lambda a: torch.zeros(3), {"zeros": 1}, {"zeros": 1}, 1),
    ("matmul", lambda a: torch.mm(a, a), {"mm": 1}, {"mm": 1}, 1),
    ("out variant", lambda a: torch.mm(a, a, out=torch.empty(3, 3)), {"empty": 1, "mm": 1}, {"mm": 1}, 1),
    ("view then in place", lambda a: a.t().add_(1), {"t": 1, "add_": 1}, {"add_": 1}, 0),
    ("views in a list", lambda a: torch.split(a, 1), {"split": 1}, {}, 0),
    ("two outputs", lambda a: torch.sort(a), {"sort": 1}, {"sort": 1}, 2),
])
def test_aten_work_and_allocations(name, fn, ops, launches, allocations):
    a = torch.randn(3, 3)
    _, work = host_counts.count_work(lambda: fn(a))
    assert (work.aten_ops, work.aten_launches, work.allocations) == (ops, launches, allocations), name
    assert work.triton_launches == {}
    assert work.launches == sum(launches.values())


def test_training_step_of_the_reference_block():
    """Forward: addmm, relu_, addmm, add_, relu_ (and 2 views); backward of sum: 10 more launches."""
    block = fr.ResidualBlock(4, 4)
    x = torch.randn(5, 4, requires_grad=True)

    def setup():
        for t in (x, *block.parameters()):
            t.grad = None

    counts = host_counts.count_call(lambda: block(x).sum().backward(), setup)
    launches = counts.work.aten_launches
    assert {k: launches[k] for k in ("addmm", "relu_", "add_", "mm", "threshold_backward")} == {
        "addmm": 2, "relu_": 2, "add_": 1, "mm": 4, "threshold_backward": 2}
    assert counts.calls.package == 1


def test_count_call_runs_setup_before_every_call_and_counts_only_the_call():
    seen = []

    def setup():
        seen.append("setup")
        torch.empty(2)  # an allocation that must not be counted

    def call():
        seen.append("call")
        return torch.ones(2)

    counts = host_counts.count_call(call, setup, warmup=2)
    assert seen == ["setup", "call"] * 4
    assert (counts.work.allocations, counts.work.aten_ops) == (1, {"ones": 1})
    assert counts.calls.package == 0 and counts.calls.python == 1


@pytest.mark.interpreter
def test_triton_launches_are_counted(monkeypatch):
    if backends.missing_requirement("triton") is not None:
        pytest.skip("triton is not installed")
    from fused_residual.kernels import _common, fused_linear

    if not _common.interpreter_enabled():
        pytest.skip("needs the interpreter (CPU tensors)")
    a, b = torch.randn(8, 16), torch.randn(16, 8)
    _, work = host_counts.count_work(lambda: fused_linear.fused_linear(a, b, activation="relu"))
    assert work.triton_launches == {"fused_linear_kernel": 1}
