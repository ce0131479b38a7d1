"""What a case checks before it is timed: parity with the eager reference, and the memory one step takes.

Parity: the output element-wise and every tensor (gradients in training) norm-wise against the eager reference;
over ``PARITY_TOLERANCE`` the benchmark fails (a fast wrong answer is not a result). Memory: peak CUDA memory of
one step; on CPU the bytes a training step saves for backward (saved-tensor hooks, unique storages).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cases import Case
from .clocks import Runner
from .impls import Impl, module_runner

# (output tolerance, norm-wise tolerance) by (device, dtype). The output is compared element-wise,
# ``max |impl - eager| / max |eager|``: an unwritten tail or a missing bias shows. Every tensor, gradients
# included, is also compared norm-wise, ``||impl - eager|| / ||eager||``: two correct implementations may round
# a pre-activation within ~1 ulp of zero to opposite sides, and that ReLU mask flip changes a whole row of dx
# (seen: one flip in 16384 x 64 x 8 blocks, fp32, gave a 4e-2 element-wise error in dx, 5e-4 norm-wise in dx and
# 3e-3 in that layer's weight gradient). CUDA fp32 admits TF32 (Triton's default for float32 dots).
PARITY_TOLERANCE = {
    ("cpu", "fp32"): (1e-4, 2e-2),
    ("cuda", "fp32"): (5e-3, 2e-2),
    ("cuda", "fp16"): (2e-2, 5e-2),
    ("cuda", "bf16"): (5e-2, 1e-1),
}


def relative_error(actual: Tensor, expected: Tensor, norm: str = "max") -> float:
    """``max |a - e| / max |e|`` (``norm="max"``) or ``||a - e|| / ||e||`` (``norm="l2"``) over the finite
    entries; inf if the shapes differ or the non-finite entries do not match exactly."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return math.inf
    finite = torch.isfinite(e)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite].nan_to_num(), e[~finite].nan_to_num()):
        return math.inf
    if not finite.any():
        return 0.0
    diff, ref = a[finite] - e[finite], e[finite]
    if norm == "l2":
        num, den = diff.norm().item(), ref.norm().item()
    else:
        num, den = diff.abs().max().item(), ref.abs().max().item()
    return num / den if den > 0 else num


def _results(run: Runner, module: nn.Module | None, x: Tensor, dout: Tensor | None) -> dict[str, Tensor]:
    """Output and (in training) gradients of one step, cloned at once: CUDA-graph outputs get overwritten."""
    x = x.detach().clone().requires_grad_(dout is not None)
    results = {"out": run(x, dout).detach().clone()}
    if dout is not None:
        results["dx"] = x.grad.clone()
        if module is not None:
            results.update({f"d{name}": p.grad.clone() for name, p in module.named_parameters()})
    return results


def check_parity(case: Case, impl: Impl, reference: nn.Module, x: Tensor, dout: Tensor | None) -> dict[str, float]:
    """Errors of the output (element-wise and norm-wise) and of each gradient (norm-wise) against the eager
    reference, as ``{"out": .., "out_l2": .., "dx_l2": .., ...}``; raises AssertionError if one is over its
    tolerance."""
    expected = _results(module_runner(reference, reference, case.mode), reference, x, dout)
    actual = _results(impl.run, impl.module, x, dout)
    out_tol, l2_tol = PARITY_TOLERANCE[(case.device, case.dtype)]
    missing = math.inf
    errors = {"out": relative_error(actual["out"], expected["out"])}
    tolerances = {"out": out_tol}
    for name, want in expected.items():
        errors[f"{name}_l2"] = relative_error(actual[name], want, "l2") if name in actual else missing
        tolerances[f"{name}_l2"] = l2_tol
    bad = {name: err for name, err in errors.items() if not err <= tolerances[name]}
    if bad:
        listing = ", ".join(f"{name}: {err:.2e} (tolerance {tolerances[name]:.0e})" for name, err in bad.items())
        raise AssertionError(f"{case.id}: differs from the eager reference: {listing}")
    return errors


def clear_grads(module: nn.Module | None, inputs: list[tuple[Tensor, Tensor | None]]) -> None:
    if module is not None:
        for p in module.parameters():
            p.grad = None
    for x, _ in inputs:
        x.grad = None


def peak_cuda_bytes(run: Runner, x: Tensor, dout: Tensor | None) -> int:
    """Peak CUDA memory one step allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(x, dout)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def saved_tensor_bytes(run: Runner, module: nn.Module, x: Tensor, dout: Tensor) -> dict[str, int]:
    """Bytes autograd saves during one training step: unique storages, all and without the parameters."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(x, dout)
    activations = sum(n for ptr, n in storages.items() if ptr not in parameter_storages)
    return {"saved_bytes": sum(storages.values()), "saved_activation_bytes": activations}

