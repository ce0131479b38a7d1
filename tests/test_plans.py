"""Plans: a signature's plan serves a call only where every fact it depends on is the same, and computes exactly
what the layered path computes (bit for bit: the same kernels and configs, or the same torch ops)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TRITON_INSTALLED

import fused_residual as fr
from fused_residual import _tensors, dispatch, layer_plans, plans

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")


@pytest.fixture
def fresh_plans(monkeypatch):
    monkeypatch.setattr(plans, "ENABLED", True)
    plans.clear()
    yield
    plans.clear()


def make_operands(rows=20, width=24, dtype=torch.float32, seed=0, grad=False):
    torch.manual_seed(seed)
    x = torch.randn(rows, width, dtype=dtype)
    w1, w2 = (torch.randn(width, width, dtype=dtype) / width**0.5 for _ in range(2))
    b1, b2 = (torch.randn(width, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(grad) for t in (x, w1, b1, w2, b2)]


def run(x, w1, b1, w2, b2, form_kwargs=None, backward=False):
    """Output (and gradients of every operand that needs one) of the functional block."""
    out = fr.functional.residual_block(x, w1, b1, w2, b2, **(form_kwargs or {}))
    if not backward:
        return [out.detach()]
    leaves = [t for t in (x, w1, b1, w2, b2) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.5 + out.detach() * 0.25)
    return [out.detach(), *grads]


def layered(fn):
    """``fn()`` with plans off: every call takes the validating, dispatching path."""
    saved = plans.ENABLED
    plans.ENABLED = False
    try:
        return fn()
    finally:
        plans.ENABLED = saved


def assert_same_bits(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"max difference {(a.double() - e.double()).abs().max()}"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in memory that starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return flat.view(t.shape).copy_(t).requires_grad_(t.requires_grad)


def transposed_layout(t: torch.Tensor) -> torch.Tensor:
    return t.detach().t().contiguous().t().requires_grad_(t.requires_grad)


# Each entry changes one fact of the base call (20 x 24 float32, contiguous, aligned, biases, no grad).
def _changes():
    def with_x(make_x):
        return lambda ops: [make_x(ops[0]), *ops[1:]]

    def with_op(i, make):
        return lambda ops: [*ops[:i], make(ops[i]), *ops[i + 1:]]

    return {
        "row bucket": (with_x(lambda x: torch.randn(40, x.shape[1])), {}),
        "rows a multiple of 16": (with_x(lambda x: torch.randn(32, x.shape[1])), {}),
        "one row": (with_x(lambda x: torch.randn(1, x.shape[1])), {}),
        "dtype": (lambda ops: [t.half() for t in ops], {}),
        "x strided": (with_x(lambda x: torch.randn(x.shape[0], 2 * x.shape[1])[:, :x.shape[1]]), {}),
        "x misaligned": (with_x(misaligned), {}),
        "w1 strides": (with_op(1, transposed_layout), {}),
        "w2 misaligned": (with_op(3, misaligned), {}),
        "b1 absent": (with_op(2, lambda b: None), {}),
        "b2 strided": (with_op(4, lambda b: torch.randn(2 * b.shape[0])[::2]), {}),
        "x needs a gradient": (with_x(lambda x: x.detach().clone().requires_grad_(True)), {}),
        "w1 needs a gradient": (with_op(1, lambda w: w.detach().clone().requires_grad_(True)), {}),
        "form": (lambda ops: ops, {"activation": "gelu"}),
        "final activation": (lambda ops: ops, {"final_activation": None}),
    }


CHANGES = _changes()


class CountingDict(dict):
    lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)


@pytest.mark.parametrize("change", [transposed_layout, misaligned])
@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_a_parameter_whose_data_is_replaced_in_place_misses(use_backend, fresh_plans, choice, change):
    """``param.data = ...`` keeps the Parameter object (what a guard could remember) but changes its facts."""
    use_backend(choice)
    torch.manual_seed(5)
    block = fr.FusedResidualBlock(24, 24)
    x = torch.randn(20, 24)
    block(x)
    block(x)
    assert len(plans._plans) == 1
    block.linear2.weight.data = change(block.linear2.weight.data)
    out = block(x)
    assert len(plans._plans) == 2
    assert_same_bits([out], [layered(lambda: block(x))])


@pytest.mark.skipif(_tensors.TensorGuards is None, reason="this torch has no TensorGuards")
@pytest.mark.parametrize("choice", ["triton", "torch", "composite"])
def test_a_repeated_signature_is_served_by_the_guard_without_the_key(use_backend, fresh_plans, monkeypatch, choice):
    """The newest plan's guard serves a call of its signature: no key is built or looked up; another signature
    is looked up, and becomes the one the guard checks."""
    use_backend(choice)
    monkeypatch.setattr(plans, "_plans", CountingDict())
    first, second = make_operands(), make_operands(rows=21, seed=1)
    other = make_operands(width=16, seed=2)
    run(*first)
    assert plans._plans.lookups == 1  # the miss that built the plan
    assert_same_bits(run(*second), layered(lambda: run(*second)))
    assert plans._plans.lookups == 1
    run(*other)  # a new plan
    run(*first)  # the first plan again: looked up, then the guard's
    assert plans._plans.lookups == 3
    assert_same_bits(run(*second), layered(lambda: run(*second)))
    assert plans._plans.lookups == 3
    # Leading dims are outside the key (the plan flattens them) but not the guard's: the key serves them.
    batched = [second[0].reshape(3, 7, second[0].shape[1]), *second[1:]]
    assert_same_bits(run(*batched), layered(lambda: run(*batched)))
    assert plans._plans.lookups == 4 and len(plans._plans) == 2


@pytest.mark.parametrize("choice", ["triton", "triton:two_gemm", "torch", "composite"])
@pytest.mark.parametrize("change", CHANGES)
def test_every_fact_in_the_key_changed_alone_misses(use_backend, fresh_plans, choice, change):
    use_backend(choice)
    base = make_operands()
    modify, form_kwargs = CHANGES[change]
    run(*base)
    assert len(plans._plans) == 1
    again = make_operands(rows=21, seed=1)  # same bucket and class, new tensors: the plan serves it
    assert_same_bits(run(*again), layered(lambda: run(*again)))
    assert len(plans._plans) == 1
    changed = modify(make_operands(seed=2))
    backward = any(t is not None and t.requires_grad for t in changed)
    result = run(*changed, form_kwargs=form_kwargs, backward=backward)
    assert len(plans._plans) == 2, "the changed fact must not find the first plan"
    assert_same_bits(result, layered(lambda: run(*changed, form_kwargs=form_kwargs, backward=backward)))


def test_the_backend_choice_and_tf32_are_in_the_key(use_backend, fresh_plans, monkeypatch):
    use_backend("triton")
    ops = make_operands()
    run(*ops)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton:two_gemm")  # not use_backend: its dispatch.reset() clears plans
    run(*ops)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    run(*ops)
    assert len(plans._plans) == 2
    monkeypatch.setattr(plans, "_tf32", lambda: True)
    run(*ops)
    assert len(plans._plans) == 3


def test_dispatch_reset_clears_the_plans(use_backend, fresh_plans):
    use_backend("torch")
    run(*make_operands())
    assert plans._plans
    dispatch.reset()
    assert not plans._plans


@pytest.mark.parametrize("choice", ["triton", "torch", "composite"])
def test_autocast_is_in_the_key_and_the_plan_casts_like_the_layered_path(use_backend, fresh_plans, choice):
    use_backend(choice)
    ops = make_operands(grad=True)
    run(*ops, backward=True)
    assert len(plans._plans) == 1
    for dtype, seed in ((torch.float16, 1), (torch.float16, 2), (torch.bfloat16, 3)):
        if dtype == torch.bfloat16 and choice == "triton":
            continue  # no bfloat16 on Triton's interpreter
        ops = make_operands(seed=seed, grad=True)
        with torch.autocast("cpu", dtype=dtype):
            result = run(*ops, backward=True)
            expected = layered(lambda ops=ops: run(*ops, backward=True))
        assert result[0].dtype == dtype
        assert_same_bits(result, expected)
    assert len(plans._plans) == (2 if choice == "triton" else 3), "one plan per autocast dtype, the second hits"


def test_torch_func_takes_the_layered_path(use_backend, fresh_plans):
    use_backend("torch")
    block = fr.FusedResidualBlock(24, 24)
    x = torch.randn(20, 24)
    with torch.no_grad():
        block(x)
    assert len(plans._plans) == 1
    params = dict(block.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(block, p, (x,)).sum())(params)
    reference = fr.ResidualBlock(24, 24)
    reference.load_state_dict(block.state_dict())
    reference(x).sum().backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, dict(reference.named_parameters())[name].grad)
    assert len(plans._plans) == 1


def test_hooks_added_after_the_plan_was_built_fire(use_backend, fresh_plans):
    use_backend("triton")
    block = fr.FusedResidualBlock(24, 24)
    x = torch.randn(20, 24)
    with torch.no_grad():
        expected = block(x)
    seen = []
    block.linear1.register_forward_hook(lambda m, i, o: seen.append("linear1"))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        handle.remove()
    assert "linear1" in seen and "Linear" in seen
    torch.testing.assert_close(out, expected)


def test_plans_match_the_layered_path_over_random_signature_changes(use_backend, fresh_plans, monkeypatch):
    rng = random.Random(0)
    choices = ["triton", "triton:two_gemm", "torch", "composite"]
    use_backend("triton")
    built = []
    init = plans.BlockPlan.__init__

    def counted_init(self, *args):
        if plans.ENABLED:  # a plan built while plans are on: a miss
            built.append(1)
        init(self, *args)

    monkeypatch.setattr(plans.BlockPlan, "__init__", counted_init)
    calls = 0
    for step in range(30):
        if step % 5 == 0:
            monkeypatch.setenv(dispatch.ENV_VAR, rng.choice(choices))
        dtype = rng.choice([torch.float32, torch.float32, torch.float16])
        rows, width = rng.choice([1, 5, 16, 20, 33]), rng.choice([16, 24])
        strided, shifted, nd, no_b1 = (rng.random() < p for p in (0.3, 0.2, 0.2, 0.2))
        grads = [rng.random() < 0.4 for _ in range(5)]
        for seed in (2 * step, 2 * step + 1):  # twice: new tensors, the same signature (the second finds a plan)
            ops = make_operands(rows, width, dtype, seed=seed)
            if strided:
                ops[0] = torch.randn(rows, 2 * width, dtype=dtype)[:, :width]
            if shifted:
                ops[0] = misaligned(ops[0])
            if nd:
                ops[0] = ops[0].reshape(1, rows, width)
            if no_b1:
                ops[2] = None
            for t, grad in zip(ops, grads, strict=True):
                if t is not None:
                    t.requires_grad_(grad)
            backward = any(t is not None and t.requires_grad for t in ops)
            result = run(*ops, backward=backward)
            calls += 1
            assert_same_bits(result, layered(lambda ops=ops, b=backward: run(*ops, backward=b)))
    assert len(plans._plans) > 5
    assert calls - len(built) >= 20, "the second call of each signature is served by its plan"


def make_layer_operands(rows=20, width=24, dtype=torch.float32, seed=0, grad=False):
    """``(h, w, b, residual)`` of the single fused layer."""
    torch.manual_seed(seed)
    h, residual = torch.randn(rows, width, dtype=dtype), torch.randn(rows, width, dtype=dtype)
    w, b = torch.randn(width, width, dtype=dtype) / width**0.5, torch.randn(width, dtype=dtype)
    return [t.requires_grad_(grad) for t in (h, w, b, residual)]


def run_layer(h, w, b, residual, backward=False):
    out = fr.functional.linear_residual_relu(h, w, b, residual)
    if not backward:
        return [out.detach()]
    leaves = [t for t in (h, w, b, residual) if t is not None and t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.5 + out.detach() * 0.25)]


LAYER_CHANGES = {
    "row bucket": lambda ops: make_layer_operands(rows=40, seed=2),
    "dtype": lambda ops: [t.half() for t in ops],
    "h strided": lambda ops: [torch.randn(20, 48)[:, :24], *ops[1:]],
    "w strides": lambda ops: [ops[0], transposed_layout(ops[1]), *ops[2:]],
    "b absent": lambda ops: [*ops[:2], None, ops[3]],
    "residual misaligned": lambda ops: [*ops[:3], misaligned(ops[3])],
    "residual needs a gradient": lambda ops: [*ops[:3], ops[3].detach().clone().requires_grad_(True)],
}


@pytest.mark.parametrize("choice", ["triton", "torch"])
@pytest.mark.parametrize("change", LAYER_CHANGES)
def test_every_fact_in_the_single_layers_key_changed_alone_misses(use_backend, fresh_plans, choice, change):
    use_backend(choice)
    run_layer(*make_layer_operands())
    again = make_layer_operands(rows=21, seed=1)  # same bucket and class: the plan serves it
    assert_same_bits(run_layer(*again), layered(lambda: run_layer(*again)))
    assert len(plans._plans) == 1
    changed = LAYER_CHANGES[change](make_layer_operands(seed=2))
    backward = any(t is not None and t.requires_grad for t in changed)
    result = run_layer(*changed, backward=backward)
    assert len(plans._plans) == 2, "the changed fact must not find the first plan"
    assert_same_bits(result, layered(lambda: run_layer(*changed, backward=backward)))


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_the_single_layer_under_autocast_is_planned_and_casts_like_the_layered_path(use_backend, fresh_plans,
                                                                                     choice):
    use_backend(choice)
    run_layer(*make_layer_operands(grad=True), backward=True)
    for seed in (1, 2, 3):  # the second and third find the first one's plan
        ops = make_layer_operands(seed=seed, grad=True)
        with torch.autocast("cpu", dtype=torch.float16):
            result = run_layer(*ops, backward=True)
            expected = layered(lambda ops=ops: run_layer(*ops, backward=True))
        assert_same_bits(result, expected)
        assert not torch.equal(result[0], run_layer(*ops)[0]), "the GEMM ran in float16"
    assert len(plans._plans) == 2, "one plan without autocast, one with it"
    assert sum(isinstance(p, layer_plans.AutocastLayerPlan) for p in plans._plans.values()) == 1


def test_a_row_count_that_splits_k_after_one_that_did_not(use_backend, fresh_plans):
    """One plan (rows 1040 and 2048: the same bucket and class) serves a weight gradient without split-K slices,
    then one with them (its workspace a register the first member did not name): both as the layered path."""
    use_backend("triton:two_gemm")
    for rows in (1040, 2048, 1040):
        ops = make_operands(rows=rows, width=16, seed=rows, grad=True)
        assert_same_bits(run(*ops, backward=True), layered(lambda ops=ops: run(*ops, backward=True)))
    assert len(plans._plans) == 1


def test_threads_share_plans_safely(use_backend, fresh_plans):
    """Several threads calling new and seen signatures at once: every result right, no half-built plan used."""
    use_backend("torch")
    block = fr.FusedResidualBlock(16, 16)
    reference = fr.ResidualBlock(16, 16)
    reference.load_state_dict(block.state_dict())
    inputs = [torch.randn(rows, 16) for rows in (3, 17, 40, 64, 100, 3, 17, 40)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
    errors = []

    def worker(offset):
        try:
            for i in range(60):
                k = (i + offset) % len(inputs)
                with torch.no_grad():
                    torch.testing.assert_close(block(inputs[k]), expected[k])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_the_plan_cache_is_bounded(use_backend, fresh_plans, monkeypatch):
    use_backend("torch")
    monkeypatch.setattr(plans, "MAX_PLANS", 4)
    for rows in (1, 2, 3, 5, 9, 17, 33, 65):
        run(*make_operands(rows=rows))
    assert len(plans._plans) == 4


@pytest.mark.parametrize("choice", ["triton", "triton:two_gemm"])
def test_registered_ops_replay_their_plans(use_backend, fresh_plans, monkeypatch, choice):
    """What a compiled graph calls (the registered ops) records its steps once per signature and replays them."""
    from fused_residual.backends import triton_backend

    use_backend(choice)
    recorded = []
    for name in ("plan_block_forward", "plan_block_backward"):
        original = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, _f=original, **k: recorded.append(1) or _f(*a, **k))
    ops = torch.ops.fused_residual

    def both_ops(x, w1, b1, w2, b2, dout):
        out, saved = ops.block_forward(x, w1, b1, w2, b2, None, "relu", "relu", 0, True, False)  # default mode
        grads = ops.block_backward(dout, x, saved, out, w1, w2, None, None, None, "relu", "relu", [True] * 5 + [False],
                                   torch.float32)
        return [out, saved, *grads]

    for seed in (0, 1, 2):  # three row counts of one signature
        x, w1, b1, w2, b2 = make_operands(rows=20 + seed, seed=seed)
        dout = torch.randn(20 + seed, 24)
        result = both_ops(x, w1, b1, w2, b2, dout)
        if seed == 0:
            assert len(recorded) == 2
        assert_same_bits(result, layered(lambda ops=(x, w1, b1, w2, b2, dout): both_ops(*ops)))
    assert len(recorded) == 2 + 2 * 3, "one recording per signature; the layered calls record every time"


def test_plans_can_be_turned_off_by_the_environment():
    code = ("import torch, fused_residual as fr\nfrom fused_residual import plans\n"
            "fr.FusedResidualBlock(4, 4)(torch.randn(3, 4))\nprint(plans.ENABLED, len(plans._plans))")
    env = {**os.environ, plans.ENV_VAR: "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0"]


# ---- CUDA graphs -------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("choice", ["triton", "triton:two_gemm"])
def test_plans_replay_inside_a_captured_cuda_graph(use_backend, fresh_plans, choice):
    """Captured after its plans exist, a training step replays with new data: no host sync, no allocation outside
    the graph's pool (a sync or a cached buffer would fail the capture or give stale results)."""
    use_backend(choice)
    torch.manual_seed(0)
    block = fr.FusedResidualBlock(64, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = block(x)
        out.float().sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # plans recorded and kernels compiled before the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    grads = [x.grad, *(p.grad for p in block.parameters())]
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        captured = [out.detach().clone(), *(g.clone() for g in grads)]
        expected = step()
        torch.testing.assert_close(captured[0], expected.detach())
        for got, want in zip(captured[1:], [x.grad, *(p.grad for p in block.parameters())], strict=True):
            torch.testing.assert_close(got, want)
