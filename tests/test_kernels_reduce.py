"""The in-kernel deterministic sums (``kernels/_reduce.py``): split-K weight gradients and the whole-block backward's
per-program partials, summed by the last program to arrive, in slot order, with self-cleaning arrival counters.

Under the interpreter programs run one after another, so every arrival order is the sequential one; the grouping
(two levels), the slot order, the counters' reset and the results are checked here. On a GPU the CUDA tests add
real concurrency: the same bits on every run, CUDA-graph capture and replay, and two streams at once.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

from fused_residual import backends

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _reduce, whole_block  # noqa: E402
from fused_residual.kernels import fused_linear as fl  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def block_operands(rows, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g)).to(DEVICE, dtype)  # noqa: E731
    x, w1, b1, w2, b2 = make(rows, width), make(width, width, s=width**-0.5), make(width), \
        make(width, width, s=width**-0.5), make(width)
    return x, w1, b1, w2, b2, make(rows, width)


def block_weight_grads64(x, w2, dout, h, out):
    """float64 (dW1, db1, dW2, db2) at the kernels' own ReLU decisions (read from their h and out)."""
    xd, w2d, g = x.double(), w2.double(), dout.double()
    g2 = torch.where(out.double() <= 0, 0.0, g)
    g1 = torch.where(h.double() <= 0, 0.0, g2 @ w2d)
    return g1.t() @ xd, g1.sum(0), g2.t() @ h.double(), g2.sum(0)


@pytest.mark.interpreter
@pytest.mark.parametrize("programs", [1, 3, 9, 17])
def test_whole_block_partials_of_many_programs(monkeypatch, programs):
    """More programs than the interpreter's default grid: groups of ceil(sqrt(P)) slots, then the groups."""
    monkeypatch.setattr(whole_block, "_programs", lambda device, tiles: min(tiles, programs))
    x, w1, b1, w2, b2, dout = block_operands(40 * 32, 24)
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True)
    grads = whole_block.backward(dout, out, h, x, w1, w2, need_dx=False, need_weights=True)
    expected = block_weight_grads64(x, w2, dout, h, out)
    for name, got, want in zip(("dW1", "db1", "dW2", "db2"), grads[1:], expected, strict=True):
        assert_close(got, want, name, scale=16)
    again = whole_block.backward(dout, out, h, x, w1, w2, need_dx=False, need_weights=True)
    assert all(torch.equal(a, b) for a, b in zip(grads[1:], again[1:], strict=True))
    assert not _reduce.arrival_counters(torch.device(DEVICE), 1).any(), "counters must be left at 0"


@pytest.mark.interpreter
def test_counter_buffers_are_per_thread_on_the_interpreter():
    """Two threads may run interpreted launches at once: each gets its own counters."""
    import threading

    device = torch.device("cpu")
    mine = _reduce.arrival_counters(device, 4)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(_reduce.arrival_counters(device, 4)))
    thread.start()
    thread.join()
    assert theirs[0].data_ptr() != mine.data_ptr()
    assert _reduce.arrival_counters(device, 4) is mine
    bigger = _reduce.arrival_counters(device, mine.numel() + 1)  # outgrown: replaced by a zeroed, larger one
    assert bigger.numel() > mine.numel() and not bigger.any()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (under the interpreter programs run in order)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_split_k_and_whole_block_are_bitwise_reproducible(dtype):
    """Real concurrency on a GPU: many runs, the same bits (float atomics would differ from run to run)."""
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(1 << 16, 96, generator=g).cuda().to(dtype)
    a = torch.randn(1 << 16, 80, generator=g).cuda().to(dtype)
    first = fl.fused_linear(grad.t(), a, relu_mask=grad.t(), rowsum=True, split_k=32, out_dtype=dtype)
    x, w1, b1, w2, b2, dout = block_operands(1 << 16, 32, dtype)
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True)
    block_first = whole_block.backward(dout, out, h, x, w1, w2, need_dx=True, need_weights=True)
    for _ in range(20):
        again = fl.fused_linear(grad.t(), a, relu_mask=grad.t(), rowsum=True, split_k=32, out_dtype=dtype)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        block_again = whole_block.backward(dout, out, h, x, w1, w2, need_dx=True, need_weights=True)
        assert all(torch.equal(p, q) for p, q in zip(block_first, block_again, strict=True))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_replay_and_two_streams():
    """Captured launches use their own counters (re-zeroed by the graph at each replay); launches on two streams
    at once use one buffer each. Results equal the eager ones, bit for bit."""
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(1 << 15, 64, generator=g).cuda()
    a = torch.randn(1 << 15, 48, generator=g).cuda()
    eager = fl.fused_linear(grad.t(), a, rowsum=True, split_k=16)
    cached = _reduce.arrival_counters(grad.device, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        fl.fused_linear(grad.t(), a, rowsum=True, split_k=16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fl.fused_linear(grad.t(), a, rowsum=True, split_k=16)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert not cached.any()

    streams = [torch.cuda.Stream() for _ in range(2)]
    results = []
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            results.append(fl.fused_linear(grad.t(), a, rowsum=True, split_k=16))
    torch.cuda.synchronize()
    for dw, db in results:
        assert torch.equal(dw, eager[0]) and torch.equal(db, eager[1])
    with torch.cuda.stream(streams[0]):
        first = _reduce.arrival_counters(grad.device, 1)
    with torch.cuda.stream(streams[1]):
        second = _reduce.arrival_counters(grad.device, 1)
    assert len({first.data_ptr(), second.data_ptr(), cached.data_ptr()}) == 3
