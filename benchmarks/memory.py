"""What a training step keeps for backward, and what it costs: ``python -m benchmarks.memory [--quick]
[--jsonl PATH] [--out DIR]`` (``--show PATH`` prints a saved run's table; ``--out`` also writes the report page and
its plot).

Implementations, per case, all computing the same function from one seed:

- ``reference``: the eager reference module (``ResidualBlock``, ``ResidualNet``, or the transformer FFN as users
  write it, ``x + linear2(gelu(linear1(x)))``);
- ``fused``: the fused module in its default mode;
- ``recompute``: the fused module with ``recompute=True`` (keeps ``x`` and the final ReLU's sign bits, or inside
  the net each block's output, which the next layer keeps anyway; ``h`` is recomputed in backward);
- ``checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) of the reference: of the whole module for a block,
  of each block for a net (its first and last linear run as they are).

Cases: the reference block, ``ResidualNet(w, w, w, 4)`` and the FFN form (hidden ``4 w``, GELU, no final
activation), 4096 x 256 rows x width, fp32 by default; each with ``x`` requiring a gradient (a block inside a model)
and not (the model's first layer).

Measured per implementation:

- ``kept``: bytes kept for backward by one forward (``benchmarks/kept.py``: unique storages seen by
  ``saved_tensors_hooks``, parameters' storages excluded and reported apart);
- ``peak`` (CUDA only): ``torch.cuda.max_memory_allocated`` over one training step, minus what was allocated
  before it (inputs, parameters and the output gradient), with every ``.grad`` set to None first;
- ``step``: time of one training step (forward, ``y.backward(dout)``, synchronized on CUDA), the implementations
  interleaved round by round (each round: one untimed step, then ``inner`` timed ones, in an order that rotates);
  medians with the interquartile range, and per round the ratio of ``recompute`` to ``fused`` (median and IQR of
  those ratios: load from other processes hits both alike). On a shared CPU the times move with other work; the
  bytes do not.

Before anything is measured, each implementation's output and gradients are compared with the reference's (a small
keep that computes something else would be no result).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fused_residual as fr

from . import records
from .impls import FFN
from .kept import kept_for_backward

IMPLS = ("reference", "fused", "recompute", "checkpoint")
KINDS = ("block", "net", "ffn")
NET_BLOCKS = 4
FFN_HIDDEN = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |impl - reference| / max |reference| over the output and every gradient.
PARITY = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
# Bytes kept vs the reference, one fp32 training step at 4096 x 256, parameters excluded.
TARGETS = {("block", "fused"): 1.00, ("block", "recompute"): 0.36, ("net", "fused"): 1.00,
           ("net", "recompute"): 0.62, ("ffn", "fused"): 1.00, ("ffn", "recompute"): 0.15}


@dataclass(frozen=True)
class Case:
    kind: str
    rows: int
    width: int
    dtype: str = "fp32"
    device: str = "cpu"
    x_grad: bool = True

    @property
    def id(self) -> str:
        x = "x_grad" if self.x_grad else "x_frozen"
        return f"{self.kind}-{self.rows}x{self.width}-{self.dtype}-{self.device}-{x}"

    @property
    def hidden(self) -> int:
        return FFN_HIDDEN * self.width if self.kind == "ffn" else self.width


def reference_module(case: Case) -> nn.Module:
    torch.manual_seed(0)
    w = case.width
    module = {"block": lambda: fr.ResidualBlock(w, w), "net": lambda: fr.ResidualNet(w, w, w, NET_BLOCKS),
              "ffn": lambda: FFN(w, FFN_HIDDEN * w)}[case.kind]()
    return module.to(device=case.device, dtype=DTYPES[case.dtype])


def fused_module(case: Case, reference: nn.Module, recompute: bool) -> nn.Module:
    """The fused module of ``case`` with the reference's parameters."""
    w = case.width
    if case.kind == "block":
        module = fr.FusedResidualBlock(w, w, recompute=recompute)
    elif case.kind == "net":
        module = fr.FusedResidualNet(w, w, w, NET_BLOCKS, recompute=recompute)
    else:
        module = fr.FusedResidualBlock(w, w, hidden_features=FFN_HIDDEN * w, activation="gelu",
                                       final_activation=None, recompute=recompute)
    module = module.to(device=case.device, dtype=DTYPES[case.dtype])
    module.load_state_dict(reference.state_dict())
    return module


def checkpointed(reference: nn.Module) -> Callable[[Tensor], Tensor]:
    """The reference under ``torch.utils.checkpoint``: each block of a net, else the whole module."""
    blocks = getattr(reference, "blocks", None)
    if blocks is None:
        return lambda x: checkpoint(reference, x, use_reentrant=False)

    def net(x: Tensor) -> Tensor:
        a = torch.relu_(reference.linear1(x))
        for block in blocks:
            a = checkpoint(block, a, use_reentrant=False)
        return reference.linear2(a)

    return net


@dataclass
class Impl:
    name: str
    forward: Callable[[Tensor], Tensor]
    module: nn.Module  # holds the parameters


def build(case: Case) -> list[Impl]:
    reference = reference_module(case)
    fused, recompute = (fused_module(case, reference, r) for r in (False, True))
    return [Impl("reference", reference, reference), Impl("fused", fused, fused),
            Impl("recompute", recompute, recompute), Impl("checkpoint", checkpointed(reference), reference)]


def _inputs(case: Case) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.rows, case.width, generator=g).to(case.device, dtype).requires_grad_(case.x_grad)
    dout = torch.randn(case.rows, case.width, generator=g).to(case.device, dtype)
    return x, dout


def _clear(impl: Impl, x: Tensor) -> None:
    for p in impl.module.parameters():
        p.grad = None
    x.grad = None


def _step(impl: Impl, x: Tensor, dout: Tensor) -> Tensor:
    _clear(impl, x)
    y = impl.forward(x)
    y.backward(dout)
    return y


def _results(impl: Impl, x: Tensor, dout: Tensor) -> list[Tensor]:
    y = _step(impl, x, dout).detach()
    grads = [p.grad for p in impl.module.parameters()]
    return [y, *grads, *([x.grad] if x.grad is not None else [])]


def parity_error(impl: Impl, reference: Impl, x: Tensor, dout: Tensor) -> float:
    expected, got = _results(reference, x, dout), _results(impl, x, dout)
    if len(expected) != len(got):
        raise AssertionError(f"{impl.name}: {len(got)} results, the reference {len(expected)}")
    worst = 0.0
    for e, a in zip(expected, got, strict=True):
        scale = e.abs().max().item() or 1.0
        worst = max(worst, (a.double() - e.double()).abs().max().item() / scale)
    return worst


def peak_bytes(impl: Impl, x: Tensor, dout: Tensor) -> int:
    torch.cuda.synchronize()
    _clear(impl, x)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = impl.forward(x)
    y.backward(dout)
    del y
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def spread(values: list[float]) -> dict[str, float]:
    if len(values) > 1:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = median = q3 = values[0]
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def time_steps(impls: list[Impl], x: Tensor, dout: Tensor, rounds: int, inner: int
               ) -> tuple[dict[str, list[float]], list[float]]:
    """Per implementation every timed step (ms), and per round the ratio recompute / fused of their medians."""
    cuda = x.is_cuda
    samples: dict[str, list[float]] = {impl.name: [] for impl in impls}
    ratios: list[float] = []
    clock = time.perf_counter
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(impls)
            medians: dict[str, float] = {}
            for impl in impls[shift:] + impls[:shift]:
                _step(impl, x, dout)  # untimed
                times = []
                for _ in range(inner):
                    _clear(impl, x)
                    if cuda:
                        torch.cuda.synchronize()
                    start = clock()
                    impl.forward(x).backward(dout)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append((clock() - start) * 1e3)
                samples[impl.name] += times
                medians[impl.name] = statistics.median(times)
            if "recompute" in medians and "fused" in medians:
                ratios.append(medians["recompute"] / medians["fused"])
    finally:
        gc.enable()
    return samples, ratios


def measure(case: Case, rounds: int = 10, inner: int = 3) -> dict[str, Any]:
    """One case: every implementation's bytes kept, peak (CUDA), step time and parity; one record."""
    impls = build(case)
    x, dout = _inputs(case)
    reference = impls[0]
    found: dict[str, dict[str, Any]] = {}
    ready = []
    for impl in impls:
        info: dict[str, Any] = {}
        if impl is not reference:
            info["parity"] = err = parity_error(impl, reference, x, dout)
            if not err <= PARITY[case.dtype]:
                raise AssertionError(f"{case.id}: {impl.name} differs from the reference: {err:.2e} "
                                     f"(tolerance {PARITY[case.dtype]:.0e})")
        _clear(impl, x)
        y, kept = kept_for_backward(lambda impl=impl: impl.forward(x), exclude=list(impl.module.parameters()))
        y.backward(dout)
        del y
        info["kept"] = asdict(kept)
        if x.is_cuda:
            info["peak_bytes"] = peak_bytes(impl, x, dout)
        found[impl.name] = info
        ready.append(impl)
    samples, ratios = time_steps(ready, x, dout, rounds, inner) if rounds else ({}, [])
    for name, times in samples.items():
        found[name]["step_ms"] = spread(times)
    ref_bytes = found["reference"]["kept"]["nbytes"]
    return {
        "type": "memory", "case": case.id, **asdict(case), "hidden": case.hidden,
        "blocks": NET_BLOCKS if case.kind == "net" else 0,
        "backend": os.environ.get(fr.BACKEND_ENV_VAR, "auto"),
        "impls": found,
        "kept_over_reference": {name: info["kept"]["nbytes"] / ref_bytes for name, info in found.items()},
        "recompute_over_fused_time": spread(ratios) if ratios else None,
    }


def cases(kinds: list[str], rows: int, width: int, dtype: str, device: str) -> list[Case]:
    return [Case(kind, rows, width, dtype, device, x_grad) for kind in kinds for x_grad in (True, False)]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds of 2 steps (default: 10 rounds of 3)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per case (0: no timing)")
    p.add_argument("--inner", type=int, help="timed steps per implementation and round")
    p.add_argument("--kinds", default=",".join(KINDS), help="block,net,ffn (default: all)")
    p.add_argument("--rows", type=int, default=4096, help="rows of x (default: 4096)")
    p.add_argument("--width", type=int, default=256, help="block width (default: 256)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="default: fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where available, else cpu")
    p.add_argument("--jsonl", metavar="PATH", help="append one JSON line per case to PATH")
    p.add_argument("--out", metavar="DIR", help="write memory.md and its plot to DIR")
    p.add_argument("--show", metavar="PATH", help="print the table of a JSON-lines file written by --jsonl; no run")
    args = p.parse_args(argv)
    for name in ("rounds", "inner"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "rounds" else 1):
            p.error(f"--{name} must be {'>= 0' if name == 'rounds' else 'positive'}, got {value}")
    if args.rows < 1 or args.width < 1:
        p.error("--rows and --width must be positive")
    args.rounds = (3 if args.quick else 10) if args.rounds is None else args.rounds
    args.inner = args.inner or (2 if args.quick else 3)
    args.kinds = args.kinds.split(",")
    if not set(args.kinds) <= set(KINDS):
        p.error(f"--kinds {args.kinds} not among {list(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from .memory_report import table, write_report

    args = _parse(argv)
    if args.show:
        print(table([r for r in records.read(args.show)[0] if r.get("type") == "memory"]))
        return 0
    from .env_info import describe

    environment = describe()
    found = []
    for case in cases(args.kinds, args.rows, args.width, args.dtype, args.device):
        started = time.perf_counter()
        record = measure(case, args.rounds, args.inner)
        record["method"] = {"rounds": args.rounds, "inner": args.inner}
        record["environment"] = environment
        if args.jsonl:
            records.append(args.jsonl, record)
        found.append(record)
        print(f"   {case.id}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    print(table(found))
    if args.out:
        print(f"wrote {', '.join(map(str, write_report(found, args.out)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
