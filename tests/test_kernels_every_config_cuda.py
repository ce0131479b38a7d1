"""On a GPU: every autotune candidate of every kernel, forced one at a time, against float64 math.

Autotuning picks one config per shape, so a config that miscompiles could hide behind a faster one until a new
shape selects it. The ahead-of-time tests prove each compiles without spills; these prove each computes right.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

from fused_residual import backends

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import fused_linear as fl  # noqa: E402
from fused_residual.kernels import fused_linear_configs as flc  # noqa: E402
from fused_residual.kernels import whole_block, whole_net  # noqa: E402
from fused_residual.kernels import whole_block_configs as wbc  # noqa: E402
from fused_residual.kernels._tma import tma_layout  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _capability():
    return torch.cuda.get_device_capability()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tile_epilogue", [False, True], ids=["bias_relu", "residual_gate"])
@pytest.mark.parametrize("masked_a", [False, True], ids=["a", "masked_a"])
def test_fused_linear_every_config(dtype, tile_epilogue, masked_a):
    g = torch.Generator().manual_seed(0)
    m, k, n = 300, 200, 130
    a = torch.randn(m, k, generator=g).cuda().to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).cuda().to(dtype)
    bias = torch.randn(n, generator=g).cuda().to(dtype)
    extra = torch.randn(m, n, generator=g).cuda().to(dtype)
    relu_out = torch.randn(m, k, generator=g).cuda().to(dtype)
    kwargs = {"residual": extra, "gate": extra} if tile_epilogue else {}
    if masked_a:
        kwargs["relu_mask"] = relu_out
    a64 = torch.where(relu_out.double() <= 0, 0.0, a.double()) if masked_a else a.double()
    acc = a64 @ w.double().t() + bias.double() + (extra.double() if tile_epilogue else 0)
    if tile_epilogue:
        acc = torch.where(extra.double() <= 0, 0.0, acc)
    expected = torch.relu(acc)
    element = torch.empty(0, dtype=dtype).element_size()
    tma = tma_layout(a, w.t(), q=kwargs.get("relu_mask")) != ""
    for config in flc.config_table(_capability(), element, tile_epilogue, masked_a, tma=tma, warp_specialize=True):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        fl.fused_linear(a, w.t(), bias=bias, activation="relu", out=out, config=config, **kwargs)
        assert_close(out, expected, f"config {config}", scale=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("split_k", [1, 4, 19])
def test_weight_gradient_every_config(dtype, split_k):
    """dW = (dY * (Y > 0))^T a with its row sums, split-K reduced inside the launch (19: two levels)."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5000, 96, generator=g).cuda().to(dtype)
    relu_out = torch.randn(5000, 96, generator=g).cuda().to(dtype)
    a = torch.randn(5000, 80, generator=g).cuda().to(dtype)
    g64 = torch.where(relu_out.double() <= 0, 0.0, grad.double())
    element = torch.empty(0, dtype=dtype).element_size()
    tma = tma_layout(grad.t(), a, q=relu_out.t()) != ""
    for config in flc.config_table(_capability(), element, masked_a=True, tma=tma):
        dw, db = fl.fused_linear(grad.t(), a, relu_mask=relu_out.t(), rowsum=True, split_k=split_k, out_dtype=dtype,
                                 config=config)
        assert_close(dw, g64.t() @ a.double(), f"dW {config}", scale=16)
        assert_close(db, g64.sum(0), f"db {config}", scale=16)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="Hopper schedules: sm_90")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("epilogue", ["bias_relu", "bias_residual_relu", "gate", "second", "masked_a",
                                      "masked_residual"])
def test_hopper_schedules_every_epilogue(dtype, epilogue):
    """Each Hopper schedule the prune hook allows for the launch, forced, in every epilogue kind and both operand
    layouts of B (W^T for the forward layers, W row-major for dx), ragged M and N, against float64."""
    g = torch.Generator().manual_seed(2)
    m, k, n = 1000, 192, 520
    a = torch.randn(m, k, generator=g).cuda().to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).cuda().to(dtype)
    kwargs = {"bias": torch.randn(n, generator=g).cuda().to(dtype), "activation": "relu"}
    extra = torch.randn(m, n, generator=g).cuda().to(dtype)
    if epilogue in ("bias_residual_relu", "masked_residual"):
        kwargs["residual"] = extra
    if epilogue == "gate":
        kwargs["gate"] = extra
    if epilogue == "second":
        kwargs["second"] = (torch.randn(m, 64, generator=g).cuda().to(dtype),
                            (torch.randn(n, 64, generator=g) / 8).cuda().to(dtype).t())
    if epilogue == "masked_a":
        kwargs["relu_mask"] = torch.randn(m, k, generator=g).cuda().to(dtype)
    if epilogue == "masked_residual":
        kwargs.update(relu_mask=torch.randn(m, n, generator=g).cuda().to(dtype), mask_on="residual")
    a64 = torch.where(kwargs["relu_mask"].double() <= 0, 0.0, a.double()) if epilogue == "masked_a" else a.double()
    for b in (w.t(), w.t().contiguous()):
        if "second" in kwargs:  # SB laid out as B, as TMA needs
            sa, sb = kwargs["second"]
            kwargs["second"] = (sa, sb.contiguous() if b.is_contiguous() else sb.t().contiguous().t())
        acc = a64 @ b.double() + kwargs["bias"].double()
        if "second" in kwargs:
            acc = acc + kwargs["second"][0].double() @ kwargs["second"][1].double()
        if "residual" in kwargs:
            r = extra.double()
            acc = acc + (torch.where(kwargs["relu_mask"].double() <= 0, 0.0, r) if epilogue == "masked_residual"
                         else r)
        if "gate" in kwargs:
            acc = torch.where(extra.double() <= 0, 0.0, acc)
        expected = torch.relu(acc)
        q = kwargs["relu_mask"] if epilogue == "masked_a" else None
        assert tma_layout(a, b, *kwargs.get("second", (None, None)), q) != ""
        table = flc.config_table(_capability(), 2, "residual" in kwargs or "gate" in kwargs, epilogue == "masked_a",
                                tma=True, warp_specialize="second" not in kwargs)
        schedules = [c for c in table if flc.features(c)]
        assert schedules
        for config in schedules:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            fl.fused_linear(a, b, out=out, config=config, **kwargs)
            assert_close(out, expected, f"config {config}, B strides {b.stride()}", scale=4)


def test_autotuned_tma_choice_is_not_reused_for_misaligned_operands():
    """The autotuner's choice at aligned operands (where TMA schedules compete on sm_90) must not serve a call whose
    operands break TMA's alignment rules at the same shapes: that call gets its own choice, and a right answer."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(512, 256, generator=g) / 16).cuda().half()
    bias = torch.randn(512, generator=g).cuda().half()
    aligned = torch.randn(2048, 256, generator=g).cuda().half()
    misaligned = torch.randn(2048, 264, generator=g).cuda().half()[:, 4:260]  # rows 528 bytes apart, base + 8 bytes
    assert tma_layout(aligned, w.t()) != "" or _capability()[0] < 9
    assert tma_layout(misaligned, w.t()) == ""
    for x in (aligned, misaligned, aligned, misaligned):
        out, _ = fl.fused_linear(x, w.t(), bias=bias, activation="relu")
        assert_close(out, torch.relu(x.double() @ w.double().t() + bias.double()), "out", scale=4)
        if x is misaligned:
            assert "tma" not in flc.features(flc.config_key(fl.fused_linear_autotuned.best_config))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("features", [10, 30, 64, 100, 200])
def test_whole_block_and_net_every_config(dtype, features):
    element = torch.empty(0, dtype=dtype).element_size()
    width = wbc.padded_width(features)
    if width > wbc.MAX_FORWARD_WIDTH[element]:
        pytest.skip("wider than the forward kernel takes at this dtype")
    g = torch.Generator().manual_seed(features)
    x = torch.randn(1000, features, generator=g).cuda().to(dtype)
    w1, w2 = ((torch.randn(features, features, generator=g) / features**0.5).cuda().to(dtype) for _ in range(2))
    b1, b2 = (torch.randn(features, generator=g).cuda().to(dtype) for _ in range(2))
    h64 = torch.relu(x.double() @ w1.double().t() + b1.double())
    out64 = torch.relu(h64 @ w2.double().t() + b2.double() + x.double())
    for config in wbc.forward_configs(width, element, capability=_capability()):
        out, h = whole_block.forward(x, w1, b1, w2, b2, store_saved=True, config=config)
        assert_close(out, out64, f"block out {config}", scale=4)
        assert_close(h, h64, f"block h {config}", scale=4)
    if width > wbc.WEIGHTS_ON_CHIP_WIDTH[element]:
        return  # the whole net keeps its weights on chip
    for config in whole_net.configs(width):
        stack = lambda t: t.unsqueeze(0).expand(3, *t.shape)  # noqa: E731
        y = whole_net.forward(x, w1, b1, stack(w1), stack(b1), stack(w2), stack(b2), w2, b2, config=config)
        a = h64
        for _ in range(3):
            a = torch.relu(torch.relu(a @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double() + a)
        assert_close(y, a @ w2.double().t() + b2.double(), f"net {config}", scale=16)
