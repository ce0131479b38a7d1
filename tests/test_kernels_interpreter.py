"""The Triton kernels themselves, run by Triton's interpreter on CPU (or on the GPU where there is one).

Each case is checked against float64 math written here, with ragged sizes that are multiples of no tile, several
tile configurations, non-contiguous operands, and poisoned outputs (NaN-filled before the launch) so that an
element the kernel fails to write shows up.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_close

from fused_residual import backends
from fused_residual.activations import ACTIVATIONS, NAMES

pytestmark = pytest.mark.interpreter

if backends.missing_requirement("triton") is not None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fused_residual.kernels import _common  # noqa: E402
from fused_residual.kernels import fused_linear as fl  # noqa: E402
from fused_residual.kernels import fused_linear_configs as flc  # noqa: E402
from fused_residual.kernels._tma import tma_layout  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
SIZES = [1, 10, 17, 48, 130, 200]
# Interpreter configs: its default plus tiles smaller and larger than the sizes above.
CONFIGS = [None, (16, 16, 16, 1, 4), (64, 32, 32, 1, 4)] if not HAS_CUDA else [None]


def rand(*shape, dtype=torch.float32, generator=None):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)


def reference(a, b, second=None, bias=None, residual=None, relu_mask=None, mask_on="a", gate=None,
              gate_activation="relu", activation=None, b_activation=None):
    """float64 ``(C, pre)`` of fused_linear's documented math (``pre``: the result before ``activation``)."""
    a = a.double()
    if relu_mask is not None and mask_on == "a":
        a = torch.where(relu_mask.double() <= 0, 0.0, a)
    b = b.double() if b_activation is None else ACTIVATIONS[b_activation].forward(b.double())
    acc = a @ b
    if second is not None:
        acc = acc + second[0].double() @ second[1].double()
    if bias is not None:
        acc = acc + bias.double()
    if residual is not None:
        r = residual.double()
        if relu_mask is not None and mask_on == "residual":
            r = torch.where(relu_mask.double() <= 0, 0.0, r)
        acc = acc + r
    if gate is not None:
        acc = ACTIVATIONS[gate_activation].backward(acc, gate.double())
    pre = acc
    if activation is not None:
        acc = ACTIVATIONS[activation].forward(acc)
    return acc, pre


def scale_for(k):
    """Tolerance scale for sums of k products (rounding grows about like sqrt(k))."""
    return max(1.0, (k / 16) ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m,k,n", [(1, 10, 10), (17, 48, 130), (130, 17, 48), (200, 130, 17), (48, 200, 1),
                                   (10, 1, 200)])
@pytest.mark.parametrize("epilogue", ["plain", "bias_relu", "bias_residual_relu", "gate", "second", "masked_a",
                                      "masked_residual"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "default" if c is None else "x".join(map(str, c[:3])))
def test_fused_linear_epilogues_on_ragged_shapes(dtype, m, k, n, epilogue, config):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, w = rand(m, k, dtype=dtype, generator=g), rand(n, k, dtype=dtype, generator=g)
    kwargs = {}
    if epilogue in ("bias_relu", "bias_residual_relu"):
        kwargs.update(bias=rand(n, dtype=dtype, generator=g), activation="relu")
    if epilogue in ("bias_residual_relu", "masked_residual"):
        kwargs["residual"] = rand(m, n, dtype=dtype, generator=g)
    if epilogue == "gate":
        kwargs["gate"] = rand(m, n, dtype=dtype, generator=g)
    if epilogue == "second":
        kwargs.update(second=(rand(m, 13, dtype=dtype, generator=g), rand(n, 13, dtype=dtype, generator=g).t()),
                      activation="relu")
    if epilogue == "masked_a":  # the ReLU backward on load: A * (Q > 0), Q with other strides than A
        kwargs["relu_mask"] = rand(k, m, dtype=dtype, generator=g).t()
    if epilogue == "masked_residual":
        kwargs.update(relu_mask=rand(m, n, dtype=dtype, generator=g), mask_on="residual")
    out = poisoned(m, n, dtype)
    c, sums = fl.fused_linear(a, w.t(), out=out, config=config, **kwargs)
    assert c is out and sums is None
    assert not c.isnan().any(), f"{int(c.isnan().sum())} output elements never written"
    assert_close(c, reference(a, w.t(), **kwargs)[0], "C", scale=scale_for(k + 13))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_relu_masks_follow_aten_exactly(dtype):
    """0 where the ReLU output is <= 0 (both zeros), the gradient where it is > 0 or NaN, on A and on the residual:
    aten.threshold_backward's rule, checked against aten itself."""
    m, k, n = 6, 16, 16
    dout = rand(m, k, dtype=dtype)
    relu_out = torch.tensor([0.0, -0.0, 1e-3, -1e-3, float("nan"), float("inf"), -float("inf"), 2.0] * 2,
                            device=DEVICE, dtype=dtype).expand(m, k).contiguous()
    eye = torch.eye(k, device=DEVICE, dtype=dtype)
    expected = torch.ops.aten.threshold_backward(dout, relu_out, 0)
    c, _ = fl.fused_linear(dout, eye, relu_mask=relu_out)
    assert torch.equal(c, expected)
    c, _ = fl.fused_linear(torch.zeros(m, 1, device=DEVICE, dtype=dtype), torch.zeros(1, n, device=DEVICE, dtype=dtype),
                           residual=dout, relu_mask=relu_out, mask_on="residual")
    assert torch.equal(c, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("activation", NAMES)
@pytest.mark.parametrize("m,k,n", [(17, 48, 130), (130, 17, 48)])
def test_activation_epilogues_gates_and_b_operands(dtype, activation, m, k, n):
    """Every activation of the registry, against its torch function and derivative in float64: forward
    ``act(acc)`` with the pre-activation stored; backward ``acc * act'(saved)``; ``g^T act(P)`` with ``act``
    computed on load of B, split-K reduced."""
    g = torch.Generator().manual_seed(m + k + n)
    a, w, bias = rand(m, k, dtype=dtype, generator=g), rand(n, k, dtype=dtype, generator=g), rand(n, dtype=dtype,
                                                                                                 generator=g)
    pre = poisoned(m, n, dtype)
    c, _ = fl.fused_linear(a, w.t(), bias=bias, activation=activation, pre_out=pre)
    expected, expected_pre = reference(a, w.t(), bias=bias, activation=activation)
    assert_close(pre, expected_pre, "pre-activation", scale=scale_for(k))
    assert_close(c, expected, "act(acc)", scale=scale_for(k))

    saved = rand(m, n, dtype=dtype, generator=g)
    if ACTIVATIONS[activation].from_output:
        saved = saved.relu()
    c, _ = fl.fused_linear(a, w.t(), gate=saved, gate_activation=activation)
    assert_close(c, reference(a, w.t(), gate=saved, gate_activation=activation)[0], "gated", scale=scale_for(k))

    p = rand(m, n, dtype=dtype, generator=g)  # a saved pre-activation as B of a weight gradient
    grad = rand(m, k, dtype=dtype, generator=g)
    for split_k in (1, 3):
        dw, db = fl.fused_linear(grad.t(), p, b_activation=activation, rowsum=True, split_k=split_k)
        assert_close(dw, reference(grad.t(), p, b_activation=activation)[0], f"dW split {split_k}", scale=scale_for(m))
        assert_close(db, grad.double().sum(0), "db", scale=scale_for(m))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows,n_out,n_in", [(1, 10, 10), (200, 17, 48), (130, 48, 1), (1000, 33, 20)])
@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("masked", [False, True], ids=["g", "masked_g"])
def test_weight_gradient_split_k_and_row_sums(dtype, rows, n_out, n_in, split_k, masked):
    """``dW = g'^T a`` with the bias gradient as fused row sums, ``g' = g * (Y > 0)`` applied on load; split-K
    partials summed inside the launch, in slot order (12 slices: two levels of groups), written in ``dtype``."""
    g = torch.Generator().manual_seed(rows + split_k)
    grad, a = rand(rows, n_out, dtype=dtype, generator=g), rand(rows, n_in, dtype=dtype, generator=g)
    relu_out = rand(rows, n_out, dtype=dtype, generator=g) if masked else None
    out = poisoned(n_out, n_in, dtype)
    dw, db = fl.fused_linear(grad.t(), a, relu_mask=None if relu_out is None else relu_out.t(), rowsum=True,
                             split_k=split_k, out_dtype=dtype, out=out if split_k == 1 else None)
    assert dw.dtype == db.dtype == dtype and not dw.isnan().any() and not db.isnan().any()
    g64 = grad.double() if relu_out is None else torch.where(relu_out.double() <= 0, 0.0, grad.double())
    assert_close(dw, g64.t() @ a.double(), "dW", scale=scale_for(rows))
    assert_close(db, g64.sum(0), "db", scale=scale_for(rows))
    again = fl.fused_linear(grad.t(), a, relu_mask=None if relu_out is None else relu_out.t(), rowsum=True,
                            split_k=split_k, out_dtype=dtype)
    assert torch.equal(dw, again[0]) and torch.equal(db, again[1]), "weight gradients must be deterministic"


def test_split_k_counters_are_left_at_zero():
    """The arrival counters are cached per device and stream (thread, here): every launch must leave them at 0."""
    from fused_residual.kernels import _reduce

    grad, a = rand(700, 40), rand(700, 24)
    for split_k in (2, 9, 30):
        dw, _ = fl.fused_linear(grad.t(), a, rowsum=True, split_k=split_k)
        assert_close(dw, grad.double().t() @ a.double(), f"dW split {split_k}", scale=scale_for(700))
        counters = _reduce.arrival_counters(torch.device(DEVICE), 1)
        assert counters.numel() >= _reduce.counters_needed(split_k) and not counters.any()


@pytest.mark.parametrize("count", [1, 2, 8, 9, 17, 64, 264])
def test_reduction_groups_cover_every_slot_once(count):
    """The two-level grouping: groups of consecutive slots that cover 0..count-1 exactly once, a serial chain of
    about 2 sqrt(count) for large counts, and the workspace holds partials, group sums and the total."""
    from fused_residual.kernels import _reduce

    group = _reduce.group_size(count)
    groups = -(-count // group)
    covered = [s for i in range(groups) for s in range(i * group, min(count, (i + 1) * group))]
    assert covered == list(range(count))
    assert _reduce.counters_needed(count) == groups + 1 and _reduce.workspace_slots(count) == count + groups + 1
    assert group + (groups if groups > 1 else 0) <= max(8, 2 * count**0.5 + 2)


@pytest.mark.parametrize("layout", ["a_transposed", "b_row_major", "strided", "output_strided"])
def test_any_strides(layout):
    g = torch.Generator().manual_seed(7)
    m, k, n = 33, 40, 27
    a = rand(m, k, generator=g)
    b = rand(n, k, generator=g).t()
    out = None
    if layout == "a_transposed":
        a = rand(k, m, generator=g).t()
    elif layout == "b_row_major":
        b = rand(k, n, generator=g)
    elif layout == "strided":
        a = rand(m, 2 * k, generator=g)[:, ::2]
        b = rand(2 * k, n + 5, generator=g)[::2, 2:2 + n]
    else:
        out = torch.full((n, m), float("nan"), device=DEVICE).t()
    residual = rand(n, m, generator=g).t()
    c, _ = fl.fused_linear(a, b, residual=residual, activation="relu", out=out)
    assert not c.isnan().any()
    assert_close(c, reference(a, b, residual=residual, activation="relu")[0], "C", scale=scale_for(k))


def test_nan_and_inf_propagate_like_torch():
    a = rand(20, 16)
    w = rand(24, 16)
    a[3, 5] = float("nan")
    a[7, 0] = float("inf")
    c, _ = fl.fused_linear(a, w.t(), bias=rand(24), activation="relu")
    expected = torch.relu(a.double() @ w.double().t())
    assert torch.equal(c.isnan(), (expected.isnan() | (a.double() @ w.double().t()).isnan()).to(DEVICE))
    assert c[3].isnan().all()


def test_empty_problems_launch_nothing_and_are_correct():
    from fused_residual.kernels._launch import count_launches

    with count_launches() as launches:
        c, _ = fl.fused_linear(rand(0, 8), rand(6, 8).t(), bias=rand(6), activation="relu")
    assert c.shape == (0, 6) and not launches
    c, _ = fl.fused_linear(rand(5, 0), rand(0, 6), bias=torch.ones(6, device=DEVICE), activation="relu")
    assert torch.equal(c, torch.ones(5, 6, device=DEVICE))  # K = 0: the epilogue alone


@pytest.mark.parametrize("low", [d for d in DTYPES if d != torch.float32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", ["wide_a", "wide_second", "wide_residual_and_output", "wide_b_split_k"])
def test_autocast_operands_are_read_once_and_rounded_on_chip(low, case):
    """fp32 activations next to 16-bit weights (autocast): the wide operand is rounded to the weights' dtype for
    the GEMM (as autocast's linear does), the residual added un-rounded, the output written in its own dtype.
    Values near 100 make a rounded residual show (fp16 rounds 100.3 by up to 0.03; fp32 tolerance is 5e-3 there)."""
    g = torch.Generator().manual_seed(17)
    m, k, n = 37, 40, 29
    a = rand(m, k, generator=g)
    w = rand(n, k, dtype=low, generator=g) / 8
    round_ = lambda t: t.to(low).double()  # noqa: E731
    if case == "wide_a":
        bias = rand(n, dtype=low, generator=g)
        c, _ = fl.fused_linear(a, w.t(), bias=bias, activation="relu", out_dtype=low)
        assert c.dtype == low
        assert_close(c, torch.relu(round_(a) @ w.double().t() + bias.double()), "C", scale=scale_for(k))
    elif case == "wide_second":
        h = rand(m, 16, dtype=low, generator=g)
        ws = rand(n, 16, dtype=low, generator=g)
        c, _ = fl.fused_linear(h, ws.t(), second=(a, w.t()), out_dtype=low)
        assert_close(c, h.double() @ ws.double().t() + round_(a) @ w.double().t(), "C", scale=scale_for(k + 16))
    elif case == "wide_residual_and_output":
        residual = 100 + torch.rand(m, n, generator=g).to(DEVICE)
        c, _ = fl.fused_linear(a.to(low), w.t(), residual=residual, out_dtype=torch.float32)
        assert c.dtype == torch.float32
        expected = round_(a) @ w.double().t() + residual.double()
        assert_close(c, expected, "C", scale=scale_for(k))  # fp32 tolerance: an fp16-rounded residual fails
    else:
        grad = rand(900, n, dtype=low, generator=g)
        relu_out = rand(900, n, dtype=low, generator=g)
        x = rand(900, k, generator=g)
        for split_k in (1, 3):
            dw, db = fl.fused_linear(grad.t(), x, relu_mask=relu_out.t(), rowsum=True, split_k=split_k,
                                     out_dtype=low)
            g64 = torch.where(relu_out.double() <= 0, 0.0, grad.double())
            assert dw.dtype == db.dtype == low
            assert_close(dw, g64.t() @ round_(x), f"dW split {split_k}", scale=scale_for(900))
            assert_close(db, g64.sum(0), f"db split {split_k}", scale=scale_for(900))


# --- Hopper schedules (fused_linear.HOPPER_SCHEDULES) -----------------------------------------------------------
# Each schedule's features at interpreter-sized tiles (the GPU sizes are compiled ahead of time and run on CUDA by
# test_kernels_every_config_cuda.py). The interpreter runs device-side TMA descriptors (triton 3.6 and 3.9), the
# persistent tile loop and the split epilogue. Warp specialization is a compiler transformation the interpreter
# ignores (its loop runs as written: "tma+persistent+ws" would repeat "tma+persistent"), so it is left to the CUDA
# tests. Sizes keep every stride a multiple of 16 bytes (TMA's rule); M and N are ragged.
SCHEDULES = sorted({flc.features(e) for e in flc.HOPPER_SCHEDULES if "ws" not in flc.features(e)})
HOPPER_DTYPES = [torch.float32, torch.float16] if not HAS_CUDA else []  # on CUDA: the every-config tests


def _small(features):
    return (32, 32, 16, 1, 4, "+".join(features))


@pytest.mark.parametrize("dtype", HOPPER_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("features", SCHEDULES, ids="+".join)
@pytest.mark.parametrize("epilogue", ["masked_a_bias_gate_relu", "second_masked_residual_bias_relu"])
def test_hopper_schedules_match_float64(dtype, features, epilogue, monkeypatch):
    """Every schedule with every epilogue (two launches cover them all) on ragged M and N: persistent programs
    walk several tiles (3 "SMs" for 9 tiles), the split epilogue writes both halves, TMA zero-fills past the
    edges."""
    monkeypatch.setattr(_common, "multiprocessors", lambda device: 3)
    g = torch.Generator().manual_seed(len(epilogue))
    m, k, n = 70, 32, 90
    a, w = rand(m, k, dtype=dtype, generator=g), rand(n, k, dtype=dtype, generator=g)
    kwargs = {"bias": rand(n, dtype=dtype, generator=g), "activation": "relu"}
    if epilogue.startswith("masked_a"):  # Q laid out as A, as TMA needs
        kwargs.update(relu_mask=rand(m, k, dtype=dtype, generator=g), gate=rand(m, n, dtype=dtype, generator=g))
        q = kwargs["relu_mask"]
    else:
        kwargs.update(second=(rand(m, 16, dtype=dtype, generator=g), rand(n, 16, dtype=dtype, generator=g).t()),
                      residual=rand(m, n, dtype=dtype, generator=g), relu_mask=rand(m, n, dtype=dtype, generator=g),
                      mask_on="residual")
        q = None
    assert tma_layout(a, w.t(), *kwargs.get("second", (None, None)), q) == "kk"
    out = poisoned(m, n, dtype)
    fl.fused_linear(a, w.t(), out=out, config=_small(features), **kwargs)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements never written"
    assert_close(out, reference(a, w.t(), **kwargs)[0], "C", scale=scale_for(k + 16))


@pytest.mark.parametrize("dtype", HOPPER_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("features", SCHEDULES, ids="+".join)
@pytest.mark.parametrize("n_out,sms,split_k", [(24, 5, 12), (104, 3, 3)])
def test_hopper_weight_gradients_split_k(dtype, features, n_out, sms, split_k, monkeypatch):
    """``dW = g'^T x`` with row sums through TMA with A = g^T (M-contiguous, transposed on chip) and its mask. A
    persistent launch takes as many K slices as fill the "SMs": 1 tile on 5 takes 5 of the 12 slices (two levels
    of reduction groups); 4 tiles on 3 take one slice, written directly. Deterministic."""
    monkeypatch.setattr(_common, "multiprocessors", lambda device: sms)
    g = torch.Generator().manual_seed(n_out + sms + split_k)
    rows, n_in = 400, 24
    grad, x, relu_out = (rand(rows, c, dtype=dtype, generator=g) for c in (n_out, n_in, n_out))
    assert tma_layout(grad.t(), x, q=relu_out.t()) == "mn"
    dw, db = fl.fused_linear(grad.t(), x, relu_mask=relu_out.t(), rowsum=True, split_k=split_k, out_dtype=dtype,
                             config=_small(features))
    g64 = torch.where(relu_out.double() <= 0, 0.0, grad.double())
    assert_close(dw, g64.t() @ x.double(), "dW", scale=scale_for(rows))
    assert_close(db, g64.sum(0), "db", scale=scale_for(rows))
    again = fl.fused_linear(grad.t(), x, relu_mask=relu_out.t(), rowsum=True, split_k=split_k, out_dtype=dtype,
                            config=_small(features))
    assert torch.equal(dw, again[0]) and torch.equal(db, again[1]), "weight gradients must be deterministic"


def test_persistent_grid_fills_the_sms_once():
    for tiles in (1, 5, 31, 132, 1000):
        for split_k in (1, 4, 64):
            programs, splits = flc.persistent_grid(tiles, split_k, 132)
            assert 1 <= splits <= split_k and programs * splits <= max(132, tiles) and programs <= tiles
            assert splits == 1 or programs == tiles  # slices only once every tile has its program


def test_tma_layout_rules():
    """TMA needs a 16-byte aligned base, a unit stride and the other stride a multiple of 16 bytes; Q and the
    second pair must be laid out as A and B. Anything else: "" (the prune hook then drops every TMA schedule)."""
    x = torch.randn(64, 48, dtype=torch.float16)
    w = torch.randn(40, 48, dtype=torch.float16)
    assert tma_layout(x, w.t()) == "kk"
    assert tma_layout(x, w.t().contiguous()) == "kn"
    assert tma_layout(x.t().contiguous().t(), w.t()) == "mk"
    assert tma_layout(x.t().contiguous().t(), w.t().contiguous()) == "mn"
    padded = torch.randn(64, 56, dtype=torch.float16)
    assert tma_layout(padded[:, :48], w.t()) == "kk"  # 112-byte rows: aligned
    assert tma_layout(torch.randn(64, 49, dtype=torch.float16)[:, 1:], w.t()) == ""  # base 2 bytes off
    assert tma_layout(torch.randn(64, 52, dtype=torch.float16)[:, :48], w.t()) == ""  # 104-byte rows
    assert tma_layout(torch.randn(64, 96, dtype=torch.float16)[:, ::2], w.t()) == ""  # no unit stride
    assert tma_layout(x, torch.randn(40, 44, dtype=torch.float16).t()) == ""  # 88-byte rows of W
    assert tma_layout(x, w.t(), q=x.t().contiguous().t()) == ""  # Q laid out unlike A
    assert tma_layout(x, w.t(), x, torch.randn(48, 40, dtype=torch.float16)) == ""  # B2 unlike B
    assert tma_layout(torch.randn(64, 12), torch.randn(12, 40)) == "kn"  # fp32: 48-byte rows
    with pytest.raises(ValueError, match="qualify for TMA"):  # a forced TMA schedule is refused, never run wrong
        fl.fused_linear(torch.randn(64, 52, dtype=torch.float16)[:, :48], w.t(), config=_small(("tma",)))


def test_a_tma_choice_is_never_reused_for_a_call_that_does_not_qualify(monkeypatch):
    """The autotuner decides once per key and the launch cache serves a decision per key, keyword arguments
    included (kernels/_launch.py): TMA_LAYOUT is an autotune key passed by keyword, so a call whose operands do not
    qualify (same shapes, dtypes and flags otherwise) gets its own decision, among configs without TMA."""
    launches = []
    monkeypatch.setattr(_common, "on_interpreter", lambda device: False)
    monkeypatch.setattr(fl, "_launch_tuned", lambda grid, *args, **flags: launches.append((args, flags)))
    w, bias = torch.randn(256, 128, dtype=torch.float16), torch.randn(256, dtype=torch.float16)
    fl.fused_linear(torch.randn(512, 128, dtype=torch.float16), w.t(), bias=bias)
    fl.fused_linear(torch.randn(512, 129, dtype=torch.float16)[:, 1:], w.t(), bias=bias)
    (args1, flags1), (args2, flags2) = launches
    assert (flags1["TMA_LAYOUT"], flags2["TMA_LAYOUT"]) == ("kk", "")
    tuner = fl.fused_linear_autotuned
    names = fl.fused_linear_kernel.arg_names

    def tuner_key(args, flags):  # what Autotuner.run keys its decision on (before the dtypes)
        named = {**dict(zip(names, args, strict=False)), **flags}
        return tuple(named[k] for k in tuner.keys)

    assert tuner_key(args1, flags1) != tuner_key(args2, flags2) and "TMA_LAYOUT" in tuner.keys

    def allowed(args, flags):
        return [flc.config_key(c) for c in tuner.early_config_prune(
            tuner.configs, dict(zip(names, args, strict=False)), **flags)]

    assert any("tma" in flc.features(c) for c in allowed(args1, flags1))
    assert not any("tma" in flc.features(c) for c in allowed(args2, flags2))


def test_tiny_problems_keep_the_smallest_classic_tile_only(monkeypatch):
    """At a tiny problem (N = 1) the prune hook keeps only tiles no larger than it: the smallest classic one, no
    Hopper schedule (whose tiles are all 128 rows or more)."""
    launches = []
    monkeypatch.setattr(_common, "on_interpreter", lambda device: False)
    monkeypatch.setattr(fl, "_launch_tuned", lambda grid, *args, **flags: launches.append((args, flags)))
    fl.fused_linear(torch.randn(3, 8, dtype=torch.float16), torch.randn(1, 8, dtype=torch.float16).t())
    (args, flags), = launches
    assert flags["TMA_LAYOUT"] == "kk"
    tuner = fl.fused_linear_autotuned
    kept = tuner.early_config_prune(tuner.configs, dict(zip(fl.fused_linear_kernel.arg_names, args, strict=False)),
                                    **flags)
    assert [flc.config_key(c) for c in kept] == [flc.HOPPER_16BIT[-1]]
