"""The implementations a case compares, built so that all compute the same function.

The eager reference comes from one seed; every other implementation loads its state_dict (or shares its
weights). Each is a ``Runner``: one step of the case's mode on ``(x, dout)`` (forward under ``no_grad``; a training
step with ``y.backward(dout)``, or ``y.sum().backward()`` in the ``train-sum`` mode).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fused_residual as fr

from .cases import FFN_HIDDEN, REFERENCE, RO_FUSED, RO_REFERENCE, Case
from .clocks import TORCH_DTYPES, Runner

SEED = 0


@dataclass
class Impl:
    name: str
    run: Runner  # one step of the case's mode on (x, dout); returns the output
    module: nn.Module | None  # holds the parameters whose gradients a training step fills
    checks_parity: bool = True
    compiled: bool = False


class FFN(nn.Module):
    """The transformer FFN as users write it: ``x + linear2(gelu(linear1(x)))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear2(torch.nn.functional.gelu(self.linear1(x)))


def build_reference(case: Case) -> nn.Module:
    """The eager reference, from ``SEED``: built in float32 and cast, like the tests' seeded pairs."""
    torch.manual_seed(SEED)
    w = case.width
    if case.ffn:
        module = FFN(w, FFN_HIDDEN * w)
    else:
        module = fr.ResidualNet(w, w, w, case.blocks) if case.blocks else fr.ResidualBlock(w, w)
    return module.to(device=case.device, dtype=TORCH_DTYPES[case.dtype])


def module_runner(fn: Callable[[Tensor], Tensor], module: nn.Module, mode: str,
                  before: Callable[[], object] | None = None) -> Runner:
    params = list(module.parameters())
    if mode == "forward":

        def forward(x: Tensor, dout: Tensor | None) -> Tensor:
            if before is not None:
                before()
            with torch.no_grad():
                return fn(x)

        return forward

    sum_loss = mode == "train-sum"  # loss = y.sum(): the dout it hands down is expanded ones

    def train(x: Tensor, dout: Tensor | None) -> Tensor:
        if before is not None:
            before()
        for p in params:
            p.grad = None
        x.grad = None
        out = fn(x)
        if sum_loss:
            out.sum().backward()
        else:
            out.backward(dout)
        return out

    return train


def _bare_gemm_runner(reference: nn.Module, mode: str) -> Runner:
    """The block's GEMMs alone (2 forward, 4 more in training), no bias, residual, ReLU or autograd."""
    w1, w2 = reference.linear1.weight.detach(), reference.linear2.weight.detach()

    def run(x: Tensor, dout: Tensor | None) -> Tensor:
        with torch.no_grad():
            h = torch.mm(x, w1.t())
            out = torch.mm(h, w2.t())
            if dout is not None:
                dh = torch.mm(dout, w2)
                torch.mm(dh, w1)  # dx
                torch.mm(dout.t(), h)  # dW2
                torch.mm(dh.t(), x)  # dW1
            return out

    return run


def _addmm_activation_runner(reference: nn.Module) -> Runner:
    """Forward with ``torch._addmm_activation``: cuBLASLt's bias+ReLU epilogue on the first GEMM; the second
    takes ``x + b2`` as its C matrix (one elementwise pass) and ReLU."""
    w1, b1 = reference.linear1.weight.detach(), reference.linear1.bias.detach()
    w2, b2 = reference.linear2.weight.detach(), reference.linear2.bias.detach()

    def run(x: Tensor, dout: Tensor | None) -> Tensor:
        with torch.no_grad():
            h = torch._addmm_activation(b1, x, w1.t())
            return torch._addmm_activation(torch.add(x, b2), h, w2.t())

    return run


def _fused_module(case: Case, reference: nn.Module) -> nn.Module:
    factory = {"device": case.device, "dtype": TORCH_DTYPES[case.dtype]}
    w = case.width
    if case.ffn:
        module = fr.FusedResidualBlock(w, w, hidden_features=FFN_HIDDEN * w, activation="gelu",
                                       final_activation=None, **factory)
    elif case.blocks:
        module = fr.FusedResidualNet(w, w, w, case.blocks, **factory)
    else:
        module = fr.FusedResidualBlock(w, w, **factory)
    module.load_state_dict(reference.state_dict())
    return module


# impl -> (torch.compile mode, compiles the fused module instead of the reference)
COMPILED = {"compile": (None, False), "max-autotune": ("max-autotune", False),
            RO_REFERENCE: ("reduce-overhead", False), RO_FUSED: ("reduce-overhead", True)}


def build_impl(case: Case, reference: nn.Module) -> Impl:
    if case.impl == REFERENCE:
        module = copy.deepcopy(reference)
        return Impl(case.impl, module_runner(module, module, case.mode), module)
    if case.impl in COMPILED:
        mode, fused = COMPILED[case.impl]
        module = _fused_module(case, reference) if fused else copy.deepcopy(reference)
        torch._dynamo.reset()  # a fresh compile: no recompile limit, no guards from earlier cases
        compiled = torch.compile(module, mode=mode, dynamic=False)
        # max-autotune and reduce-overhead replay CUDA graphs: each step starts a new generation of their outputs.
        before = torch.compiler.cudagraph_mark_step_begin if mode and case.device == "cuda" else None
        return Impl(case.impl, module_runner(compiled, module, case.mode, before), module, compiled=True)
    if case.impl == "fused":
        module = _fused_module(case, reference)
        return Impl(case.impl, module_runner(module, module, case.mode), module)
    if case.impl == "bare-gemm":
        return Impl(case.impl, _bare_gemm_runner(reference, case.mode), None, checks_parity=False)
    if case.impl == "addmm-act":
        if case.mode != "forward":
            raise ValueError("addmm-act has no backward: forward only")
        return Impl(case.impl, _addmm_activation_runner(reference), None)
    raise ValueError(f"unknown implementation {case.impl!r}")

