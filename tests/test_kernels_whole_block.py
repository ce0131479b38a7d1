"""The whole-block kernels (forward with h kept on chip or stored; fused backward), in the interpreter or on GPU.

Checked against float64 math written here, on odd and tiny widths (padded inside the kernel), ragged row
counts, non-contiguous inputs and NaN-poisoned outputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import HAS_CUDA, RELU_TIE_BAND, assert_close

from fused_residual import backends
from fused_residual.activations import ACTIVATIONS

pytestmark = pytest.mark.interpreter

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _common, whole_block  # noqa: E402
from fused_residual.kernels import whole_block_configs as wbc  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
WIDTHS = [1, 5, 10, 17, 48, 64]
ROWS = [1, 33, 130]


def params(width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) / max(1, width) ** 0.5).to(DEVICE, dtype)
    x = torch.randn(max(ROWS), width, generator=g).to(DEVICE, dtype)
    return x, make(width, width), make(width), make(width, width), make(width)


def nan_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width", WIDTHS + [128])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("store_h", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("grid", ["tile_per_program", "persistent"])
def test_forward(dtype, width, rows, store_h, grid):
    if width > wbc.WEIGHTS_ON_CHIP_WIDTH[torch.empty(0, dtype=dtype).element_size()]:
        pytest.skip("wider than the forward kernel keeps on chip at this dtype (test_streamed_forward)")
    x, w1, b1, w2, b2 = params(width, dtype, seed=width * 100 + rows)
    x = x[:rows]
    out, h = nan_like(x), nan_like(x)
    # persistent: 1 program per SM (the interpreter pretends 2 SMs), so programs loop over several tiles
    if HAS_CUDA:
        config = (64, 4, 0) if grid == "tile_per_program" else (64, 4, 1)
    else:
        config = (32, 4, 0) if grid == "tile_per_program" else (16, 4, 1)
    got_out, got_h = whole_block.forward(x, w1, b1, w2, b2, store_saved=store_h, out=out,
                                         saved=h if store_h else None, config=config)
    assert got_out is out and (got_h is h if store_h else got_h is None)
    assert not out.isnan().any(), "unwritten output elements"
    h64 = torch.relu(x.double() @ w1.double().t() + b1.double())
    out64 = torch.relu(h64 @ w2.double().t() + b2.double() + x.double())
    scale = max(1.0, width / 16)
    assert_close(out, out64, "out", scale=scale)
    if store_h:
        assert not h.isnan().any()
        assert_close(h, h64, "h", scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["all", "dx", "weights"])
def test_backward(dtype, width, rows, needs):
    need_dx, need_weights = needs
    x, w1, b1, w2, b2 = params(width, dtype, seed=width * 7 + rows)
    x = x[:rows]
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True)
    dout = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)
    dx_out = nan_like(x) if need_dx else None
    dx, dw1, db1, dw2, db2 = whole_block.backward(dout, out, h, x, w1, w2, need_dx=need_dx,
                                                  need_weights=need_weights, dx=dx_out)

    # float64 gradients of the block at the kernels' own h and out; ReLU decisions within the dtype's rounding
    # band of 0 follow the kernels (see conftest.block_reference), all others are float64's.
    band = RELU_TIE_BAND[dtype]
    leaves = [t.double().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    xd, w1d, b1d, w2d, b2d = leaves
    pre1 = xd @ w1d.t() + b1d
    hd = pre1 * torch.where(pre1.abs() <= band, h.double() > 0, pre1 > 0)
    pre2 = hd @ w2d.t() + b2d + xd
    outd = pre2 * torch.where(pre2.abs() <= band, out.double() > 0, pre2 > 0)
    expected = torch.autograd.grad(outd, leaves, dout.double())
    scale = max(4.0, rows / 8)
    if need_dx:
        assert dx is dx_out and not dx.isnan().any()
        assert_close(dx, expected[0], "dx", scale=scale)
    else:
        assert dx is None
    if need_weights:
        for name, got, want in zip(("dW1", "db1", "dW2", "db2"), (dw1, db1, dw2, db2), expected[1:], strict=True):
            assert got.dtype == dtype
            assert_close(got, want, name, scale=scale)
        again = whole_block.backward(dout, out, h, x, w1, w2, need_dx=False, need_weights=True)
        assert all(torch.equal(a, b) for a, b in zip(again[1:], (dw1, db1, dw2, db2), strict=True)), \
            "weight gradients must be deterministic"
    else:
        assert dw1 is None and dw2 is None


def test_non_contiguous_operands():
    dtype, width, rows = torch.float32, 24, 50
    g = torch.Generator().manual_seed(3)
    x = torch.randn(width, rows, generator=g).to(DEVICE).t()  # transposed
    w1 = torch.randn(width, 2 * width, generator=g).to(DEVICE)[:, ::2] / 5
    w2 = torch.randn(width, width, generator=g).to(DEVICE).t() / 5
    b1, b2 = torch.randn(width, generator=g).to(DEVICE), torch.randn(width, generator=g).to(DEVICE)
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True)
    h64 = torch.relu(x.double() @ w1.double().t() + b1.double())
    assert_close(out, torch.relu(h64 @ w2.double().t() + b2.double() + x.double()), "out", scale=2)
    assert out.dtype == dtype


def test_empty_batch():
    x, w1, b1, w2, b2 = params(8, torch.float32, seed=0)
    out, h = whole_block.forward(x[:0], w1, b1, w2, b2, store_saved=True)
    assert out.shape == h.shape == (0, 8)
    dx, dw1, db1, dw2, db2 = whole_block.backward(out, out, h, x[:0], w1, w2, need_dx=True, need_weights=True)
    assert dx.shape == (0, 8) and not dw1.any() and not db2.any()


@pytest.mark.parametrize("low", [d for d in DTYPES if d != torch.float32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width", [5, 48])
def test_autocast_fp32_x_with_low_precision_weights(low, width):
    """x in fp32 next to 16-bit weights (autocast): x read once, rounded on chip for the GEMMs, added un-rounded
    (100 + rand: rounding it would cost up to 0.03, beyond the fp32 tolerance of an fp32 output); backward writes
    dx in fp32 and rounds x on chip for dW1."""
    _, w1, b1, w2, b2 = params(width, low, seed=width)
    rows = 70
    g = torch.Generator().manual_seed(width)
    x = (100 + torch.rand(rows, width, generator=g)).to(DEVICE)
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and h.dtype == low
    x_low = x.to(low).double()
    h64 = torch.relu(x_low @ w1.double().t() + b1.double())
    assert_close(h, h64, "h", scale=max(1.0, width / 16))
    pre2 = h.double() @ w2.double().t() + b2.double() + x.double()  # at the kernel's own h
    assert_close(out, torch.relu(pre2), "out", scale=max(1.0, width / 16))

    dout = torch.randn(rows, width, generator=g).to(DEVICE, low)
    out_low = out.to(low)
    dx, dw1, db1, dw2, db2 = whole_block.backward(dout, out_low, h, x, w1, w2, need_dx=True, need_weights=True,
                                                  dx_dtype=torch.float32)
    assert dx.dtype == torch.float32 and dw1.dtype == low
    g2 = torch.where(out_low.double() <= 0, 0.0, dout.double())
    g1 = torch.where(h.double() <= 0, 0.0, g2 @ w2.double())
    scale = max(4.0, rows / 8)
    # dx in fp32: g1 W1 from 16-bit operands accumulates in fp32; g2 itself is added exactly.
    assert_close(dx, g1 @ w1.double() + g2, "dx", dtype=low, scale=scale)
    assert_close(dw1, g1.t() @ x_low, "dW1", scale=scale)
    assert_close(db1, g1.sum(0), "db1", scale=scale)
    assert_close(dw2, g2.t() @ h.double(), "dW2", scale=scale)
    assert_close(db2, g2.sum(0), "db2", scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width", [5, 48])
def test_without_final_relu(dtype, width):
    """The FFN form's final: ``out = relu(x W1^T + b1) W2^T + b2 + x`` and its gradients (``out`` is not read)."""
    rows = 130
    x, w1, b1, w2, b2 = params(width, dtype, seed=width + 1)
    x = x[:rows]
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, final_relu=False, out=nan_like(x))
    assert not out.isnan().any()
    h64 = torch.relu(x.double() @ w1.double().t() + b1.double())
    assert_close(out, h64 @ w2.double().t() + b2.double() + x.double(), "out", scale=max(1.0, width / 16))
    dout = torch.randn(rows, width, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    dx, dw1, db1, dw2, db2 = whole_block.backward(dout, None, h, x, w1, w2, need_dx=True, need_weights=True,
                                                  final_relu=False)
    g2 = dout.double()
    g1 = torch.where(h.double() <= 0, 0.0, g2 @ w2.double())
    scale = max(4.0, rows / 8)
    assert_close(dx, g1 @ w1.double() + g2, "dx", scale=scale)
    assert_close(dw1, g1.t() @ x.double(), "dW1", scale=scale)
    assert_close(db1, g1.sum(0), "db1", scale=scale)
    assert_close(dw2, g2.t() @ h.double(), "dW2", scale=scale)
    assert_close(db2, g2.sum(0), "db2", scale=scale)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation_computes_right(activation):
    """The kernels take any activation of the registry (the backend sends "heavy" ones to the two-GEMM kernels:
    here they spill registers beyond width 16); the saved tensor is the activation's output or its input, the
    pre-activation, as the registry's ``from_output`` says. FFN form: ``out`` is not read."""
    act = ACTIVATIONS[activation]
    rows, width = 70, 12
    x, w1, b1, w2, b2 = params(width, torch.float32, seed=3)
    x = x[:rows]
    out, saved = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, activation=activation, final_relu=False)
    pre64 = x.double() @ w1.double().t() + b1.double()
    assert_close(saved, act.forward(pre64) if act.from_output else pre64, "saved")
    assert_close(out, act.forward(pre64) @ w2.double().t() + b2.double() + x.double(), "out", scale=2)
    dout = torch.randn(rows, width, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    dx, dw1, db1, dw2, db2 = whole_block.backward(dout, None, saved, x, w1, w2, need_dx=True, need_weights=True,
                                                  activation=activation, final_relu=False)
    g1 = act.backward(dout.double() @ w2.double(), saved.double())
    h = saved.double() if act.from_output else act.forward(saved.double())
    for name, got, want in (("dx", dx, g1 @ w1.double() + dout.double()), ("dW1", dw1, g1.t() @ x.double()),
                            ("db1", db1, g1.sum(0)), ("dW2", dw2, dout.double().t() @ h),
                            ("db2", db2, dout.double().sum(0))):
        assert_close(got, want, name, scale=8)


# Beyond the widths whose weights fit on chip: the forward streams them in chunks of hidden units, the backward
# splits its programs by role (kernels/whole_block.py). Ragged widths (130, 200: padded to 256; 100: to 128) leave
# the last hidden chunk partly padded; forced small configs at width 48 (padded 64) run the same code cheaply,
# with a last backward chunk that is all padding.
STREAMED = [(130, None), (200, None), (48, wbc.ForwardConfig(16, 4, 0, 16, 1))]
SPLIT = [(100, None), (48, wbc.BackwardConfig(16, 4, 16))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("width, config", STREAMED, ids=lambda v: str(v) if isinstance(v, int) else "")
@pytest.mark.parametrize("store_h, final_relu", [(True, True), (False, False)], ids=["training", "inference_ffn"])
def test_streamed_forward(dtype, width, config, store_h, final_relu):
    rows = 33
    x, w1, b1, w2, b2 = params(width, dtype, seed=width + 5)
    x = x[:rows]
    out, h = nan_like(x), nan_like(x)
    if config is None:
        assert wbc.padded_width(width) > wbc.WEIGHTS_ON_CHIP_WIDTH[x.element_size()]
    got_out, got_h = whole_block.forward(x, w1, b1, w2, b2, store_saved=store_h, final_relu=final_relu, out=out,
                                         saved=h if store_h else None, config=config)
    assert got_out is out and (got_h is h if store_h else got_h is None)
    assert not out.isnan().any(), "unwritten output elements"
    h64 = torch.relu(x.double() @ w1.double().t() + b1.double())
    pre2 = h64 @ w2.double().t() + b2.double() + x.double()
    scale = max(1.0, width / 16)
    assert_close(out, torch.relu(pre2) if final_relu else pre2, "out", scale=scale)
    if store_h:
        assert not h.isnan().any()
        assert_close(h, h64, "h", scale=scale)


@pytest.mark.parametrize("low", [d for d in DTYPES if d != torch.float32], ids=lambda d: str(d).removeprefix("torch."))
def test_streamed_forward_autocast(low):
    """An fp32 x next to 16-bit weights in the streamed forward: rounded for the GEMMs, added un-rounded."""
    width, rows = 130, 40
    _, w1, b1, w2, b2 = params(width, low, seed=9)
    x = (100 + torch.rand(rows, width, generator=torch.Generator().manual_seed(9))).to(DEVICE)
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, out_dtype=torch.float32)
    h64 = torch.relu(x.to(low).double() @ w1.double().t() + b1.double())
    assert_close(h, h64, "h", scale=width / 16)
    assert_close(out, torch.relu(h.double() @ w2.double().t() + b2.double() + x.double()), "out", scale=width / 16)


# (width, config, dtype, need_dx, need_weights, final_relu): each role alone and together, both final forms.
SPLIT_CASES = [(*SPLIT[0], torch.float32, True, True, True), (*SPLIT[0], torch.float16, True, True, False),
               (*SPLIT[1], torch.float16, True, True, True), (*SPLIT[1], torch.float32, False, True, False),
               (*SPLIT[0], torch.float16, False, True, True), (*SPLIT[1], torch.float32, True, False, True)]


@pytest.mark.parametrize("width, config, dtype, need_dx, need_weights, final_relu", SPLIT_CASES,
                         ids=[f"{w}-{str(d).removeprefix('torch.')}-{'dx' * dx}{'+' * (dx and wt)}{'weights' * wt}-"
                              f"{'relu' if relu else 'ffn'}" for w, _, d, dx, wt, relu in SPLIT_CASES])
def test_backward_split_by_role(monkeypatch, width, config, dtype, need_dx, need_weights, final_relu):
    """Two programs per hidden chunk (two partials per reduction) and per dx share, each looping over tiles."""
    rows = 130
    if config is None:
        assert wbc.backward_config(wbc.padded_width(width), 4).hidden_chunk > 0
    monkeypatch.setattr(whole_block, "_programs", lambda device, tiles: 14)  # 7 roles: 3 dx shares, 4 chunks
    x, w1, b1, w2, b2 = params(width, dtype, seed=width + 11)
    x = x[:rows]
    out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, final_relu=final_relu)
    dout = torch.randn(rows, width, generator=torch.Generator().manual_seed(12)).to(DEVICE, dtype)
    dx_out = nan_like(x) if need_dx else None
    dx, dw1, db1, dw2, db2 = whole_block.backward(dout, out if final_relu else None, h, x, w1, w2, need_dx=need_dx,
                                                  need_weights=need_weights, final_relu=final_relu, dx=dx_out,
                                                  config=config)
    g2 = torch.where(out.double() <= 0, 0.0, dout.double()) if final_relu else dout.double()
    g1 = torch.where(h.double() <= 0, 0.0, g2 @ w2.double())
    scale = max(4.0, rows / 8)
    if need_dx:
        assert dx is dx_out and not dx.isnan().any()
        assert_close(dx, g1 @ w1.double() + g2, "dx", scale=scale)
    else:
        assert dx is None
    if need_weights:
        for name, got, want in (("dW1", dw1, g1.t() @ x.double()), ("db1", db1, g1.sum(0)),
                                ("dW2", dw2, g2.t() @ h.double()), ("db2", db2, g2.sum(0))):
            assert_close(got, want, name, scale=scale)
        again = whole_block.backward(dout, out if final_relu else None, h, x, w1, w2, need_dx=False,
                                     need_weights=True, final_relu=final_relu, config=config)
        assert all(torch.equal(a, b) for a, b in zip(again[1:], (dw1, db1, dw2, db2), strict=True)), \
            "weight gradients must be deterministic"
    else:
        assert dw1 is None and dw2 is None


# The rule that picks the whole block (triton backend) at each width, for a device of each capability: the widths
# above on fake CUDA tensors (no device needed; the capability and shared memory per block are patched in).
DEVICES = {"sm_90": ((9, 0), 232448), "sm_80": ((8, 0), 166912), "sm_86": ((8, 6), 101376)}


def _fake(shape, element_size):
    return SimpleNamespace(shape=shape, device=torch.device("cuda", 0), element_size=lambda: element_size)


@pytest.mark.parametrize("device", DEVICES)
def test_backend_takes_the_whole_block_up_to_the_kernels_limits(monkeypatch, device):
    from fused_residual.backends import triton_backend

    cap, shared = DEVICES[device]
    monkeypatch.setattr(_common, "capability", lambda d: cap)
    monkeypatch.setattr(_common, "max_shared_memory", lambda d: shared)

    def forward(width, size, x_size=None):
        return triton_backend.whole_block_forward_fits(_fake((8, width), x_size or size), _fake((width, width), size),
                                                       None)

    def backward(width, size):
        return triton_backend.whole_block_backward_fits(_fake((8, width), size), _fake((width, width), size), None)

    streamed = device != "sm_86"  # its 99 KB per block hold no streamed config at width 256
    for size in (2, 4):
        assert forward(200, size) == forward(256, size) == streamed
        assert not forward(257, size)
    assert forward(130, 2, x_size=4) == streamed  # autocast
    assert forward(128, 2)  # weights on chip, 64-row tiles (98 KB)
    assert [w for w in (16, 32, 64, 100, 128, 129) if backward(w, 2)] == ([16, 32, 64, 100, 128] if cap[0] >= 9
                                                                         else [16, 32])


def test_tune_offers_the_whole_block_wherever_the_backend_takes_it(monkeypatch):
    """``python -m fused_residual.tune`` times ``triton:whole_block`` at the new widths too (auto's rule without a
    table does not take them: no GPU has measured them)."""
    from fused_residual import dispatch, tune

    monkeypatch.setattr(_common, "capability", lambda d: (9, 0))
    monkeypatch.setattr(_common, "max_shared_memory", lambda d: 232448)
    size = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
    monkeypatch.setattr(torch, "empty", lambda *shape, device, dtype: _fake(shape, size[dtype]))
    cuda = torch.device("cuda", 0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert "triton:whole_block" in tune.candidates(cuda, dtype, 256, training=True)
        assert "triton:whole_block" not in tune.candidates(cuda, dtype, 512, training=True)
        assert dispatch.conservative(True, dtype, 256, 256, 1 << 16, False, False) == "torch"
        assert dispatch.conservative(True, dtype, 128, 128, 1 << 16, False, True) == "composite"
