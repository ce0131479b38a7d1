"""How one benchmark case is built, checked and measured.

1. Modules: the eager reference from one seed; every other implementation loads its state_dict (or shares its
   weights), so all compute the same function.
2. Inputs: rotated among enough copies to leave the last-level cache (L2 on CUDA), fixed ``dout`` per copy.
3. Parity before timing: the output element-wise and every tensor (gradients in training) norm-wise against
   the eager reference; over ``PARITY_TOLERANCE`` the benchmark fails.
4. Memory: peak CUDA memory of one step; on CPU the bytes the training step saves for backward
   (saved-tensor hooks, unique storages).
5. Timing: warm-up calls absorb compilation, autotuning and CUDA-graph recording; pytest-benchmark times
   ``step + synchronize``; on CPU each implementation is also timed in alternation with the eager reference
   (``paired_timing``). On CUDA, both clocks (wall time = host time + the GPU time the host could not hide):
   - wall: ``triton.testing.do_bench`` of the whole Python call (CUDA events, L2 flushed), ``do_bench_ms``;
   - host: ``perf_counter`` around N calls without synchronizing, ``host_ms`` (``host_time``);
   - GPU: the sum of the kernel (and memset/memcpy) times torch.profiler records over N calls, ``gpu_ms``, with
     the kernels per call (``gpu_time``).
"""

from __future__ import annotations

import copy
import datetime
import gc
import itertools
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fused_residual as fr
from fused_residual import dispatch
from fused_residual.activations import SEED_FORM, Form

from .cases import FFN_HIDDEN, REFERENCE, RO_FUSED, RO_REFERENCE, Case

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

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
SEED = 0
MIN_ROUNDS, MAX_ROUNDS = 5, 5000
MAX_COPIES = 256  # rotated input sets
DEFAULT_SECONDS = {"cpu": 1.0, "cuda": 0.25}  # CUDA: do_bench, host and GPU clocks follow the pytest timing
HOST_CALLS = 30  # calls timed without synchronizing (the measurement file's count)
PROFILED_CALLS = 20  # calls under torch.profiler for the GPU clock

Runner = Callable[[Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Settings:
    seconds: float | None = None  # timed seconds per benchmark; None: DEFAULT_SECONDS of the device


@dataclass
class Impl:
    name: str
    run: Runner  # one step of the case's mode on (x, dout); returns the output
    module: nn.Module | None  # holds the parameters whose gradients a training step fills
    checks_parity: bool = True
    compiled: bool = False


# ---------------------------------------------------------------------------------------------- building


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


def _module_runner(fn: Callable[[Tensor], Tensor], module: nn.Module, mode: str,
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
        return Impl(case.impl, _module_runner(module, module, case.mode), module)
    if case.impl in COMPILED:
        mode, fused = COMPILED[case.impl]
        module = _fused_module(case, reference) if fused else copy.deepcopy(reference)
        torch._dynamo.reset()  # a fresh compile: no recompile limit, no guards from earlier cases
        compiled = torch.compile(module, mode=mode, dynamic=False)
        # max-autotune and reduce-overhead replay CUDA graphs: each step starts a new generation of their outputs.
        before = torch.compiler.cudagraph_mark_step_begin if mode and case.device == "cuda" else None
        return Impl(case.impl, _module_runner(compiled, module, case.mode, before), module, compiled=True)
    if case.impl == "fused":
        module = _fused_module(case, reference)
        return Impl(case.impl, _module_runner(module, module, case.mode), module)
    if case.impl == "bare-gemm":
        return Impl(case.impl, _bare_gemm_runner(reference, case.mode), None, checks_parity=False)
    if case.impl == "addmm-act":
        if case.mode != "forward":
            raise ValueError("addmm-act has no backward: forward only")
        return Impl(case.impl, _addmm_activation_runner(reference), None)
    raise ValueError(f"unknown implementation {case.impl!r}")


# ------------------------------------------------------------------------------------------------ inputs


def cache_bytes(device: torch.device) -> int:
    """Size of the cache the inputs must leave: L2 on CUDA, the last-level cache of CPU 0 elsewhere."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return 32 << 20


def element_size(case: Case) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[case.dtype]).element_size()


def input_set_bytes(case: Case) -> int:
    """Bytes one rotated input set holds: x, and in training dout and the gradient x keeps."""
    return case.rows * case.width * element_size(case) * (3 if case.mode != "forward" else 1)


def rotation_copies(case: Case, budget: int) -> int:
    per_set = input_set_bytes(case)
    want = math.ceil(3 * cache_bytes(torch.device(case.device)) / per_set)
    return max(1, min(want, MAX_COPIES, budget // per_set))


def make_inputs(case: Case, copies: int) -> list[tuple[Tensor, Tensor | None]]:
    generator = torch.Generator(device=case.device)
    generator.manual_seed(SEED + 1)
    factory = {"device": case.device, "dtype": TORCH_DTYPES[case.dtype], "generator": generator}
    inputs = []
    for _ in range(copies):
        x = torch.randn(case.rows, case.width, **factory)
        dout = None
        if case.mode == "train":
            x.requires_grad_(True)
            dout = torch.randn(case.rows, case.width, **factory)
        elif case.mode == "train-sum":  # the gradient out.sum().backward() hands the block: ones, expanded
            x.requires_grad_(True)
            dout = torch.ones((), device=case.device, dtype=TORCH_DTYPES[case.dtype]).expand(case.rows, case.width)
        inputs.append((x, dout))
    return inputs


def working_set_bytes(case: Case) -> int:
    """A generous estimate of what one step allocates besides the inputs (compiled variants included)."""
    activation = case.rows * case.width * element_size(case)
    layers = case.blocks + 1 if case.blocks else 1
    return activation * (4 + (8 * layers if case.mode != "forward" else 2)) + 8 * case.width**2 * layers * 4


# ------------------------------------------------------------------------------------------------ parity


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
    expected = _results(_module_runner(reference, reference, case.mode), reference, x, dout)
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


# ------------------------------------------------------------------------------------------------ memory


def _clear_grads(module: nn.Module | None, inputs: list[tuple[Tensor, Tensor | None]]) -> None:
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


# ------------------------------------------------------------------------------------------------ timing


def _choose_rounds(timed: Callable[[], object], seconds: float) -> int:
    """Rounds that fill ``seconds``, from the median of a few calls (one slow call must not decide)."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (len(samples) < 50 and time.perf_counter() - start < 0.1 * seconds):
        t0 = time.perf_counter()
        timed()
        samples.append(time.perf_counter() - t0)
    per_call = sorted(samples)[len(samples) // 2]
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, seconds / max(per_call, 1e-9))))


def paired_timing(reference: Runner, impl: Runner, inputs: list[tuple[Tensor, Tensor | None]],
                  seconds: float) -> dict[str, float]:
    """The eager reference and ``impl`` timed in alternation (A B B A ...): load from other processes that comes
    and goes hits both alike, so the median of the per-pair ratios stays steady on a shared machine."""
    cycle = itertools.cycle(inputs)
    ref_times: list[float] = []
    impl_times: list[float] = []

    def once(run: Runner, into: list[float]) -> None:
        x, dout = next(cycle)
        t0 = time.perf_counter()
        run(x, dout)
        into.append(time.perf_counter() - t0)

    start = time.perf_counter()
    while len(ref_times) < MIN_ROUNDS or (time.perf_counter() - start < seconds and len(ref_times) < MAX_ROUNDS):
        first, second = ((reference, ref_times), (impl, impl_times))[:: 1 if len(ref_times) % 2 == 0 else -1]
        once(*first)
        once(*second)
    ratios = sorted(r / i for r, i in zip(ref_times, impl_times, strict=True))
    return {
        "paired_rounds": len(ratios),
        "paired_eager_s": sorted(ref_times)[len(ref_times) // 2],
        "paired_impl_s": sorted(impl_times)[len(impl_times) // 2],
        "paired_eager_over_impl": ratios[len(ratios) // 2],
    }


def host_time(step: Callable[[], object], calls: int = HOST_CALLS,
              synchronize: Callable[[], object] = torch.cuda.synchronize) -> dict[str, float]:
    """Host time per call: ``perf_counter`` around ``calls`` calls without synchronizing (the host's own cost:
    Python, dispatch, launches, as long as the GPU's queue does not fill), and the same span closed by a
    synchronize (the GPU's backlog included)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    issued = time.perf_counter()
    synchronize()
    done = time.perf_counter()
    return {"host_ms": (issued - start) * 1e3 / calls, "host_sync_ms": (done - start) * 1e3 / calls,
            "host_calls": calls}


# Device activities that are not kernels: copies and fills (profiler names "Memcpy ..." and "Memset ...").
_NOT_KERNELS = ("Memcpy", "Memset")
# Host-side launch API calls (runtime and driver; CUDA graphs launch many kernels with one call).
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchCooperative")


def device_time_summary(events: Iterable[Any], calls: int) -> dict[str, float | int | None]:
    """GPU time and launches per call from torch.profiler events of ``calls`` calls.

    ``gpu_ms``: the sum of the durations of every device event (kernels, memcpy, memset), so kernels that
    overlapped would count twice (the suite runs on one stream); ``kernels_per_call``: device events that are
    kernels; ``launch_calls_per_call``: host launch API calls (runtime and driver) the profiler saw. None where the
    profiler saw no device activity at all (a GPU clock of 0 would be a wrong number, not a fast kernel)."""
    from torch.autograd import DeviceType

    total_us = 0.0
    device_ops = kernels = launches = 0
    for event in events:
        if event.device_type == DeviceType.CUDA:
            total_us += event.time_range.end - event.time_range.start
            device_ops += 1
            kernels += not event.name.startswith(_NOT_KERNELS)
        elif event.name.startswith(_LAUNCH_CALLS):
            launches += 1
    if device_ops == 0:
        return {"gpu_ms": None, "kernels_per_call": None, "device_ops_per_call": None,
                "launch_calls_per_call": None, "profiled_calls": calls,
                "gpu_note": "torch.profiler recorded no device activity"}
    return {"gpu_ms": total_us * 1e-3 / calls, "kernels_per_call": kernels / calls,
            "device_ops_per_call": device_ops / calls, "launch_calls_per_call": launches / calls,
            "profiled_calls": calls}


def gpu_time(step: Callable[[], object], calls: int = PROFILED_CALLS) -> dict[str, float | int | str | None]:
    """GPU time per call (``device_time_summary``) of ``calls`` calls under torch.profiler. A profiler that cannot
    run (no CUPTI, say) leaves a note instead of failing the benchmark."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                step()
            torch.cuda.synchronize()
        return device_time_summary(prof.events(), calls)
    except Exception as err:  # metadata only: a profiler that cannot start must not fail the benchmark
        return {"gpu_ms": None, "gpu_note": f"torch.profiler failed: {err!r}"[:300]}


def do_bench_ms(step: Callable[[], object]) -> dict[str, float]:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed before each call): median, p20, p80 in ms."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"do_bench_ms": median, "do_bench_p20_ms": p20, "do_bench_p80_ms": p80}


# ------------------------------------------------------------------------------------------- work model


def work(case: Case) -> tuple[int, int | None]:
    """(FLOPs, minimum bytes through memory) of one step; bytes only for a block.

    Block forward: 2 GEMMs, ``4 M H^2`` FLOPs; bytes read x and the weights, write out (the whole-block
    kernel's 2 passes). Training: 3x the FLOPs; bytes of the saved-h design: forward writes h and out (3
    passes), backward reads dout, out, h, x and writes dx (5 passes), weights read twice, weight grads written.
    """
    m, h, e = case.rows, case.width, element_size(case)
    gemms = 2 * case.blocks + 2 if case.blocks else 2 * FFN_HIDDEN if case.ffn else 2
    flops = 2 * m * h * h * gemms * (3 if case.mode != "forward" else 1)
    if case.blocks or case.ffn:
        return flops, None
    if case.mode == "forward":
        return flops, e * (2 * m * h + 2 * h * h + 2 * h)
    return flops, e * (8 * m * h + 6 * h * h + 4 * h)


# ----------------------------------------------------------------------------------------- environment


COMMIT_ENV = "FUSED_RESIDUAL_COMMIT"
ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def backend_name(case: Case) -> str:
    """The route the fused modules take for this case's inputs (e.g. "triton:whole_block", "torch", "composite")."""
    dtype = TORCH_DTYPES[case.dtype]
    try:
        probe = torch.empty(1, case.width, device=case.device, dtype=dtype).expand(case.rows, case.width)
        hidden = FFN_HIDDEN * case.width if case.ffn else case.width
        weight = torch.empty(hidden, case.width, device=case.device, dtype=dtype)
        form = Form("gelu", None) if case.ffn else SEED_FORM
        return dispatch.route(probe, weight, None, form, case.mode != "forward").name
    except (TypeError, AttributeError, RuntimeError):  # metadata only: never fail a benchmark over it
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()


def commit_info() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes) of this checkout. ``FUSED_RESIDUAL_COMMIT`` wins when set: a copy of the tree
    (e.g. on a lent GPU machine) may sit inside some other git repository. Otherwise git, but only when this
    project's root is the top of the work tree git finds; else (None, None)."""
    named = os.environ.get(COMMIT_ENV, "").strip() or None
    top = _git("rev-parse", "--show-toplevel")
    ours = top is not None and Path(top).resolve() == ROOT
    head = _git("rev-parse", "HEAD") if ours else None
    if named is not None and (head is None or not head.startswith(named)):
        return named, None  # git cannot vouch for the tree's state
    if head is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head, None if status is None else bool(status)


def environment() -> dict[str, object]:
    """Where and from what a run came: date, versions, devices, git commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = commit_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "backend_env": os.environ.get(fr.BACKEND_ENV_VAR, "auto"),
    }


# --------------------------------------------------------------------------------------------- ceilings

_CEILINGS: dict[str, dict[str, object]] = {}


def measure_ceilings(device: str = "cuda") -> dict[str, object]:
    """The card's measured ceilings, once per session: a 1 GiB device-to-device copy (bytes read + written)
    and 8192^3 matrix products per dtype, each a do_bench median."""
    if device in _CEILINGS:
        return _CEILINGS[device]
    from triton.testing import do_bench

    def copy_ms(nbytes: int) -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        return do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")

    def matmul_ms(n: int, dtype: torch.dtype) -> float:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        return do_bench(lambda: torch.mm(a, b, out=c), warmup=25, rep=200, return_mode="median")

    nbytes, n = 1 << 30, 8192
    copy_GBps = 2 * nbytes / (copy_ms(nbytes) * 1e-3) / 1e9
    matmul = {name: 2 * n**3 / (matmul_ms(n, dtype) * 1e-3) / 1e12 for name, dtype in TORCH_DTYPES.items()}
    torch.cuda.empty_cache()
    _CEILINGS[device] = {
        "device_name": device_name(device),
        "copy_GBps": copy_GBps,
        "copy_bytes": nbytes,
        "matmul_TFLOPs": matmul,
        "matmul_n": n,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    return _CEILINGS[device]


def measured_ceilings() -> dict[str, dict[str, object]]:
    return dict(_CEILINGS)


# ------------------------------------------------------------------------------------------------- a case


def compile_counts() -> dict[str, int]:
    """torch.compile's running totals: graphs captured, graph breaks, CUDA-graph captures Inductor skipped
    (a reduce-overhead case with skips is not running under CUDA graphs)."""
    counters = torch._dynamo.utils.counters
    return {"compiled_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def run_case(case: Case, benchmark: Any, settings: Settings) -> None:
    """Build, check, measure and time ``case``; everything measured goes to ``benchmark.extra_info``.

    With benchmarks disabled (smoke mode) the case is built, checked and run once, nothing is timed.
    """
    timing = benchmark.enabled
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    info = benchmark.extra_info
    benchmark.group = case.group
    flops, nbytes = work(case)
    info.update(impl=case.impl, device=device.type, device_name=device_name(case.device), dtype=case.dtype,
                mode=case.mode, kind=case.kind, rows=case.rows, width=case.width, blocks=case.blocks,
                flops=flops, bytes=nbytes)
    if case.impl == "fused":
        info["backend"] = backend_name(case)
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine makes timings noisy

    budget = 512 << 20
    if cuda:
        # Free what earlier cases left: CUDA-graph pools (held by dynamo) and the allocator's cache.
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(1 << 30, free // 8)
        need = working_set_bytes(case) + input_set_bytes(case)
        if need > 0.7 * free:
            pytest.skip(f"{case.id}: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        if timing:
            info["ceilings"] = measure_ceilings(case.device)

    reference = build_reference(case)
    compile_counts_before = compile_counts()
    impl = build_impl(case, reference)
    inputs = make_inputs(case, rotation_copies(case, budget) if timing else 1)
    info["rotated_inputs"] = len(inputs)
    x0, dout0 = inputs[0]

    # Parity first (for compiled variants this call compiles): a fast wrong answer fails here.
    if impl.checks_parity:
        errors = check_parity(case, impl, reference, x0, dout0)
        info["parity"] = errors
        info["parity_out"] = errors["out"]
    # CPU: the eager reference again, to time in alternation with this implementation (see paired_timing).
    paired_reference = None
    if not cuda and timing and impl.checks_parity and case.impl != REFERENCE:
        twin = copy.deepcopy(reference)
        paired_reference = _module_runner(twin, twin, case.mode)
    del reference

    cycle = itertools.cycle(inputs)

    def step() -> Tensor:
        x, dout = next(cycle)
        return impl.run(x, dout)

    def timed() -> None:
        step()
        if cuda:
            torch.cuda.synchronize()

    warmup = 5 if impl.compiled else 3
    for _ in range(warmup if timing else 1):
        timed()
    if impl.compiled:  # after the warm-up: the backward graph compiles at the first backward
        counts = compile_counts()
        info.update({name: counts[name] - compile_counts_before[name] for name in counts})
        assert info["compiled_graphs"] > 0, f"{case.id}: torch.compile captured no graph"

    _clear_grads(impl.module, inputs)
    if cuda:
        info["peak_bytes"] = peak_cuda_bytes(impl.run, x0, dout0)
        if case.impl == "max-autotune":
            info["peak_bytes_note"] = "CUDA-graph pool allocated while recording, not counted"
    elif case.mode != "forward" and impl.module is not None:
        info.update(saved_tensor_bytes(impl.run, impl.module, x0, dout0))

    if not timing:
        benchmark.pedantic(timed, rounds=1, iterations=1)  # disabled: runs once
        return
    seconds = settings.seconds or DEFAULT_SECONDS[device.type]
    rounds = _choose_rounds(timed, seconds)
    info["rounds"] = rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    if cuda:
        info.update(do_bench_ms(step))
        info.update(host_time(step))
        info.update(gpu_time(step))
    if paired_reference is not None:
        info.update(paired_timing(paired_reference, impl.run, inputs, seconds))
