"""Fuzzing the public surface against float64 math written out here with plain ops.

Each case is drawn from a fixed seed and its index (``test_fuzz[17]`` is always the same case): an entry point
(``FusedResidualBlock``, ``functional.residual_block``, ``functional.linear_residual_relu``, ``FusedResidualNet``,
``fuse()`` of a reference model), a form (hidden activation, final ReLU or the FFN form, projection, hidden width),
a shape (leading dimensions, 0 rows now and then), strides (transposed, sliced, expanded, offset inputs; strided
weights and biases in the functional API), a dtype (float32, float16; float64 where the route takes it), a route
(``FUSED_RESIDUAL_BACKEND``: torch, composite, auto, triton and triton:two_gemm under the interpreter) and what
needs a gradient (nothing, the input only, everything; sometimes into gradients that already hold values, which
must accumulate). A forced Triton route with float64 must raise, saying why.

``pytest tests/test_fuzz.py --fuzz-cases 2000 --fuzz-seed 7`` runs more, or others (see ``conftest.py``).

Low precision: the expectation is computed from the same (rounded) inputs; the hidden layer is rounded to the
compute dtype as every implementation stores it; a final ReLU whose float64 input is within rounding of 0 follows
the decision the implementation made (read from its output), as in ``conftest.block_reference``.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import RELU_TIE_BAND, TRITON_INSTALLED, assert_close

import fused_residual as fr

ROUTES = ["torch", "composite", "auto"] + (["triton", "triton:two_gemm"] if TRITON_INSTALLED else [])
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "offset"]
ENTRIES = ["module", "module", "functional", "single_layer", "net", "fuse"]


def pytest_generate_tests(metafunc):
    if "fuzz_case" in metafunc.fixturenames:
        count, seed = metafunc.config.getoption("fuzz_cases"), metafunc.config.getoption("fuzz_seed")
        metafunc.parametrize("fuzz_case", [draw_case(seed, i) for i in range(count)], ids=str)


@dataclass(frozen=True)
class Case:
    index: int
    seed: int
    entry: str
    route: str
    dtype: torch.dtype
    lead: tuple[int, ...]
    rows: int
    width: int
    hidden: int
    out: int
    activation: str
    final: str | None
    projection: bool
    layout: str
    weight_layout: str
    grads: str  # "none" | "input" | "all"
    accumulate: bool

    def __str__(self) -> str:
        return str(self.index)

    def describe(self) -> str:
        return (f"case {self.index} (seed {self.seed}): {self.entry} via {self.route}, {self.dtype}, "
                f"x {(*self.lead, self.rows, self.width)} {self.layout}, hidden {self.hidden}, out {self.out}, "
                f"{self.activation}/{self.final}, projection={self.projection}, weights {self.weight_layout}, "
                f"grads {self.grads}, accumulate={self.accumulate}")


def draw_case(seed: int, index: int) -> Case:
    r = random.Random(seed * 1_000_003 + index)
    entry = r.choice(ENTRIES)
    route = r.choice(ROUTES)
    dtype = r.choice([torch.float32, torch.float32, torch.float16, torch.float64])
    rows = 0 if r.random() < 0.04 else r.randint(1, 24)
    lead = tuple(r.randint(1, 3) for _ in range(r.choice([0, 0, 1, 2])))
    width = r.randint(1, 40)
    activation, final, projection = r.choice(ACTIVATIONS), r.choice(["relu", "relu", None]), r.random() < 0.25
    hidden = width if r.random() < 0.5 else r.randint(1, 48)
    out = r.randint(1, 40) if projection else width
    if entry in ("net", "fuse"):  # the reference modules' form
        activation, final, projection, hidden, out = "relu", "relu", False, width, width
    if entry == "single_layer":
        activation, final, projection = "relu", "relu", False
    return Case(index, seed, entry, route, dtype, lead, rows, width, hidden, out, activation, final, projection,
                r.choice(LAYOUTS), r.choice(["contiguous", "transposed", "strided"]),
                r.choice(["none", "input", "all", "all"]), r.random() < 0.3)


# ---- inputs ------------------------------------------------------------------------------------------------

def make_input(shape: tuple[int, ...], layout: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` with the memory layout ``layout`` (its values need not be the same across layouts)."""
    *lead, rows, width = shape
    if layout == "transposed":
        t = torch.randn(*lead, width, rows, generator=g).transpose(-1, -2)
    elif layout == "sliced":
        t = torch.randn(*lead, rows, 2 * width + 1, generator=g)[..., 1::2]
    elif layout == "expanded" and rows > 1:
        t = torch.randn(*lead, 1, width, generator=g).expand(*lead, rows, width)
    elif layout == "offset":
        t = torch.randn(math.prod(shape) + 3, generator=g)[3:].view(shape)
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(dtype)


def make_weight(rows: int, cols: int, layout: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=g) * max(cols, 1) ** -0.5
    if layout == "transposed":
        w = w.t().contiguous().t()
    elif layout == "strided":
        w = torch.zeros(rows, 2 * cols).index_copy_(1, torch.arange(0, 2 * cols, 2), w)[:, ::2]
    return w.to(dtype)


def make_bias(n: int, layout: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    b = torch.randn(n, generator=g) * 0.5
    return (torch.stack([b, b]).t().reshape(-1)[::2] if layout == "strided" else b).to(dtype)


# ---- the expectation: float64, plain ops ------------------------------------------------------------------

def activation64(name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return t.clamp_min(0)
    if name == "gelu":
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))
    return t / (1 + torch.exp(-t))  # silu


def rounded_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` in value, with the identity as its gradient."""
    return t if dtype == torch.float64 else t + (t.to(dtype).double() - t).detach()


def final_relu64(pre: torch.Tensor, observed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ReLU of ``pre``; within rounding of 0 the implementation's decision (``observed > 0``) is taken."""
    band = RELU_TIE_BAND[dtype]
    return pre * torch.where(pre.abs() <= band, observed.double() > 0, pre > 0)


def block64(x, w1, b1, w2, b2, ws, activation, final, dtype, observed):
    h = rounded_like(activation64(activation, x @ w1.t() + b1), dtype)
    pre = h @ w2.t() + b2 + (x if ws is None else x @ ws.t())
    return pre if final is None else final_relu64(pre, observed, dtype)


# ---- the test ---------------------------------------------------------------------------------------------

def build(case: Case, g: torch.Generator):
    """``(call, inputs, parameters)``: ``call(x)`` runs the entry point; ``parameters`` by name (the tensors the
    gradients are asked for, besides the input); ``expect(x64, p64, observed)`` is the float64 math."""
    dtype, wl = case.dtype, case.weight_layout
    if case.entry in ("module", "fuse", "net"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fuse() must swap the reference block (and say nothing)
            if case.entry == "module":
                module = fr.FusedResidualBlock(case.width, case.out, hidden_features=case.hidden,
                                               activation=case.activation, final_activation=case.final,
                                               projection=case.projection, dtype=dtype)
            elif case.entry == "fuse":
                module = fr.fuse(torch.nn.Sequential(fr.ResidualBlock(case.width, case.width).to(dtype)))
                assert isinstance(module[0], fr.FusedResidualBlock)
            else:
                module = fr.FusedResidualNet(case.width, case.hidden, case.out, 2, dtype=dtype)
        with torch.no_grad():
            for p in module.parameters():  # the fuzzer's values, drawn from its own generator
                p.copy_(torch.randn(p.shape, generator=g) * (max(p.shape[-1], 1) ** -0.5 if p.dim() == 2 else 0.5))
        return module, dict(module.named_parameters())
    w1 = make_weight(case.hidden if case.entry == "functional" else case.out, case.width, wl, dtype, g)
    b1 = make_bias(w1.shape[0], wl, dtype, g)
    if case.entry == "single_layer":
        return (lambda x, residual: fr.functional.linear_residual_relu(x, w1, b1, residual)), {"w": w1, "b": b1}
    w2, b2 = make_weight(case.out, case.hidden, wl, dtype, g), make_bias(case.out, wl, dtype, g)
    ws = make_weight(case.out, case.width, wl, dtype, g) if case.projection else None
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, **({"ws": ws} if ws is not None else {})}
    return (lambda x: fr.functional.residual_block(x, w1, b1, w2, b2, shortcut_weight=ws,
                                                   activation=case.activation, final_activation=case.final)), params


def expectation(case: Case, x64: torch.Tensor, p: dict[str, torch.Tensor], observed: torch.Tensor,
                residual64: torch.Tensor | None) -> torch.Tensor:
    dtype = case.dtype
    if case.entry == "single_layer":
        return final_relu64(x64 @ p["w"].t() + p["b"] + residual64, observed, dtype)
    if case.entry == "functional":
        return block64(x64, p["w1"], p["b1"], p["w2"], p["b2"], p.get("ws"), case.activation, case.final, dtype,
                       observed)
    if case.entry == "net":
        a = rounded_like(activation64("relu", x64 @ p["linear1.weight"].t() + p["linear1.bias"]), dtype)
        for i in range(2):
            q = {k.split(".", 2)[2]: v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
            h = rounded_like(activation64("relu", a @ q["linear1.weight"].t() + q["linear1.bias"]), dtype)
            a = rounded_like(activation64("relu", h @ q["linear2.weight"].t() + q["linear2.bias"] + a), dtype)
        return a @ p["linear2.weight"].t() + p["linear2.bias"]
    prefix = "0." if case.entry == "fuse" else ""
    return block64(x64, p[f"{prefix}linear1.weight"], p[f"{prefix}linear1.bias"], p[f"{prefix}linear2.weight"],
                   p[f"{prefix}linear2.bias"], p.get("shortcut.weight"), case.activation, case.final, dtype,
                   observed)


def test_fuzz(fuzz_case: Case, use_backend):
    case = fuzz_case
    use_backend(case.route)
    g = torch.Generator().manual_seed(case.seed * 7919 + case.index)
    call, params = build(case, g)
    x = make_input((*case.lead, case.rows, case.width), case.layout, case.dtype, g)
    residual = (make_input((*case.lead, case.rows, case.out), "contiguous", case.dtype, g)
                if case.entry == "single_layer" else None)
    run = (lambda t: call(t, residual)) if residual is not None else call
    if case.route.startswith("triton") and case.dtype == torch.float64:
        with pytest.raises(RuntimeError, match="forced.*float64"):
            with torch.no_grad():
                run(x)
        return
    if case.entry == "net" and case.dtype == torch.float16:
        # The net's inner ReLU decisions are not observable from its output; fp16 could flip one near 0.
        case = Case(**{**case.__dict__, "dtype": torch.float32})
        for t in params.values():
            t.data = t.data.float()
        x = x.float()

    wanted = {"none": [], "input": [], "all": list(params)}[case.grads]
    for name, t in params.items():
        t.requires_grad_(name in wanted)
        # A gradient already there (laid out like its parameter, as autograd lays them out) must be added to.
        t.grad = (torch.empty_like(t).copy_(torch.randn(t.shape, generator=g)) if case.accumulate and name in wanted
                  else None)
    before = {name: None if t.grad is None else t.grad.clone() for name, t in params.items()}
    xr = x.detach().clone().requires_grad_(case.grads != "none") if case.grads != "none" else x
    out = run(xr)
    assert out.dtype == case.dtype and out.shape == (*case.lead, case.rows, case.out), case.describe()

    x64 = x.detach().double().requires_grad_(True)
    p64 = {name: t.detach().double().requires_grad_(True) for name, t in params.items()}
    residual64 = residual.double() if residual is not None else None
    expected = expectation(case, x64, p64, out.detach(), residual64)
    scale = 4 if case.dtype == torch.float16 else 2
    try:
        assert_close(out, expected, "out", scale=scale)
        if case.grads == "none":
            assert not out.requires_grad
            return
        dout = torch.randn(out.shape, generator=g).to(case.dtype)
        out.backward(dout)
        expected.backward(dout.double())
        assert_close(xr.grad, x64.grad, "grad x", scale=4 * scale)
        for name, t in params.items():
            if name not in wanted:
                assert t.grad is None, f"{name} got a gradient it did not ask for"
                continue
            want = p64[name].grad + (0 if before[name] is None else before[name].double())
            assert_close(t.grad, want, f"grad {name}", scale=4 * scale * max(1, case.rows) ** 0.5)
    except AssertionError as e:
        raise AssertionError(f"{case.describe()}: {e}") from None
