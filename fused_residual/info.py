"""``python -m fused_residual info``: what runs here, and why.

It prints the versions (this package, torch, Triton, Python), the device and its family, whether Triton's
interpreter is on, ``FUSED_RESIDUAL_BACKEND``, the dispatch tables found (and those skipped, with why), and the
route ``auto`` (or the forced backend) takes for a block call, with the reason ``dispatch`` gives: a measured
table's entry, the conservative rule, the variable. Either for blocks of the shapes given (``--width``, ``--rows``,
``--dtype``, ``--train``) or for each block of a model (``--model module:factory``: the factory, called without
arguments, returns the model), where a block whose submodules are not what the kernels compute (hooks, a
subclassed linear) says so: it calls its submodules.

Nothing here runs a kernel: the routes are asked of ``dispatch`` for probe tensors of the shapes (expanded views,
no memory), as a call of those shapes would ask it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import dispatch
from ._cli import DTYPES, HelpWithDefaults, positive, positive_ints
from .activations import REFERENCE_FORM, Form
from .kernels import _common
from .modules import FusedResidualBlock, FusedResidualNet, block_parameters, global_hooks, net_parameters
from .modules import why_not_plain as _why_not_plain
from .reference import ResidualBlock, ResidualNet

DEFAULT_WIDTHS = (64, 128, 256, 1024)
DEFAULT_ROWS = 4096


def device_family(device: torch.device) -> str:
    """The family of a GPU ``device`` as the kernels know it (``kernels/_common.py``'s ``family``)."""
    return _common.family(device).name


def versions() -> list[str]:
    build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else f"HIP {torch.version.hip}"
             if getattr(torch.version, "hip", None) else "CPU build")
    try:
        import triton

        triton_text = f"triton {triton.__version__}"
    except ImportError:
        triton_text = "triton not installed (the Triton kernels cannot run; pip install -e '.[gpu]')"
    version = sys.modules[__package__].__version__  # the package (imported before any of its modules), no import
    return [f"fused_residual {version}, torch {torch.__version__} ({build}), {triton_text}, "
            f"Python {platform.python_version()}"]


def device_lines(device: torch.device) -> list[str]:
    if _common.is_gpu(device):
        major, minor = _common.capability(device)
        lines = [f"device: {device} {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, "
                 f"family: {device_family(device)}"]
    else:
        note = ("the Triton kernels run here in Triton's interpreter" if _common.on_interpreter(device)
                else "not a GPU: the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
        lines = [f"device: {device} ({note})"]
    raw = os.environ.get("TRITON_INTERPRET")
    lines.append(f"Triton interpreter: {'on' if _common.interpreter_enabled() else 'off'} "
                 f"(TRITON_INTERPRET{' unset' if raw is None else '=' + repr(raw)})")
    raw = os.environ.get(dispatch.ENV_VAR)
    try:
        choice = dispatch.requested()
        lines.append(f"{dispatch.ENV_VAR}: {choice}" + (" (unset: the default)" if raw is None else ""))
    except ValueError as e:
        lines.append(f"{dispatch.ENV_VAR}: invalid: {e}")
    return lines


def table_lines(device: torch.device) -> list[str]:
    lines = ["dispatch tables (highest precedence first):"]
    try:
        with warnings.catch_warnings():  # the tables skipped are listed below, with why
            warnings.simplefilter("ignore")
            found = dispatch.tables()
    except ValueError as e:  # the table named by the variable cannot be read: every auto call raises this
        return [*lines, f"  error: {e}"]
    applies = set(map(id, dispatch._device_tables(device)))
    for table in found:
        cap = ".".join(map(str, table.capability))
        measured = sum(len(buckets) for buckets in table.entries.values())
        used = "used here" if id(table) in applies else "not for this device"
        lines.append(f"  {table.source}: {table.device} (capability {cap}), {measured} "
                     f"entr{'y' if measured == 1 else 'ies'}; {used}")
    for path, why in dispatch.skipped_tables():
        lines.append(f"  skipped {path}: {why}")
    if len(lines) == 1:
        lines.append("  none (auto follows the conservative rule; python -m fused_residual.tune measures one)")
    return lines


def route_line(x: torch.Tensor, w1: torch.Tensor, ws: torch.Tensor | None, form: Form, training: bool) -> str:
    """``<route>: <why>`` for a block call on ``x`` with these weights, the kernel variants where a backend has
    them; ``error: ...`` where the call would raise (a forced backend that cannot run it, a bad table)."""
    try:
        chosen, why = dispatch.decide(dispatch.requested(), x, w1, ws, form, training)
    except (RuntimeError, ValueError) as e:
        return f"error: {e}"
    text = f"{chosen.name}; {why}"
    forward, backward = dispatch.kernel_variants(chosen, x, w1, ws, form, x.dtype if training else None)
    if forward is not None:
        text += f"; kernels: {forward} forward" + (f", {backward} backward" if backward else "")
    return text


def _probe(rows: int, features: int, like: torch.Tensor) -> torch.Tensor:
    """A ``(rows, features)`` input that takes no memory: one row, expanded."""
    return torch.empty(1, features, dtype=like.dtype, device=like.device).expand(rows, features)


def shape_lines(widths: list[int], rows: int, dtype: torch.dtype, device: torch.device, training: bool) -> list[str]:
    mode = "training step" if training else "forward"
    lines = [f"routes of a reference-form block ({mode}, {rows} rows, {str(dtype).removeprefix('torch.')}, {device}):"]
    for width in widths:
        weight = torch.empty(1, 1, dtype=dtype, device=device).expand(width, width)
        line = route_line(_probe(rows, width, weight), weight, None, REFERENCE_FORM, training)
        lines.append(f"  width {width}: {line}")
    return lines


def why_submodules(block: nn.Module) -> str:
    """Why a fused block calls its submodules instead of the kernels (``block_parameters`` is None)."""
    if global_hooks():
        return "global module hooks are registered (nn.modules.module.register_module_*_hook): they must see each call"
    reasons = [why for name in ("linear1", "linear2", "shortcut")
               if (sub := block._modules.get(name)) is not None and (why := _why_not_plain(name, sub))]
    shortcut = block._modules.get("shortcut")
    if isinstance(shortcut, nn.Linear) and shortcut.bias is not None:
        reasons.append("shortcut has a bias")
    return "; ".join(reasons) or "a submodule is not a plain nn.Linear"


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (FusedResidualBlock, FusedResidualNet, ResidualBlock, ResidualNet)):
            yield name or "(the model)", module


def model_lines(model: nn.Module, rows: int, training: bool) -> list[str]:
    mode = "training step" if training else "forward"
    lines = [f"routes of the model's blocks ({mode}, {rows} rows, each block's own dtype and device):"]
    for name, module in _blocks(model):
        kind = type(module).__name__
        if isinstance(module, FusedResidualNet):
            probe = _probe(rows, module.linear1.in_features, module.linear1.weight)
            with torch.no_grad():
                plain = net_parameters(module, probe) is not None
            lines.append(f"  {name} ({kind}): " + (
                "each block as below" if training else "without autograd one unit: under auto each block as below, "
                "a forced backend's whole-net kernel where it fits" if plain
                else "calls its submodules (hooks, or parts that are not plain)"))
            continue
        if isinstance(module, ResidualNet):
            lines.append(f"  {name} ({kind}): the reference net, eager PyTorch; fr.fuse(model) swaps its blocks")
            continue
        w1 = module.linear1.weight
        shape = f"width {module.linear1.in_features}, hidden {module.linear1.out_features}, {str(w1.dtype)[6:]}"
        if isinstance(module, ResidualBlock):
            route = route_line(_probe(rows, w1.shape[1], w1), w1, None, REFERENCE_FORM, training)
            lines.append(f"  {name} ({kind}, {shape}): the reference block, eager PyTorch; once fr.fuse(model) "
                         f"swaps it: {route}")
            continue
        params = block_parameters(module)
        if params is None:
            lines.append(f"  {name} ({kind}, {shape}): calls its submodules (the plain composite, no kernels): "
                         f"{why_submodules(module)}")
            continue
        form = module.form
        final = form.final_activation or "none"
        form_text = "" if form == REFERENCE_FORM else f", activation {form.activation}, final {final}"
        route = route_line(_probe(rows, w1.shape[1], w1), w1, params[4], form, training)
        lines.append(f"  {name} ({kind}, {shape}{form_text}): {route}")
    if len(lines) == 1:
        lines.append("  no residual blocks found (FusedResidualBlock, FusedResidualNet or the reference modules)")
    return lines


def load_model(spec: str) -> nn.Module:
    """The model ``module:factory`` returns; ValueError saying what is wrong with ``spec`` (the factory's own
    errors propagate)."""
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise ValueError(f"{spec!r} is not module:factory (e.g. mypackage.models:build)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the current folder's modules are found
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r}: {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_residual info", formatter_class=HelpWithDefaults,
        description="What runs here and why: versions, the device, the dispatch tables, and the route a block call "
                    "takes (with the reason) for the shapes given or for each block of a model.")
    parser.add_argument("--width", type=positive_ints, default=None,
                        help="block width(s), comma-separated (default: " + ",".join(map(str, DEFAULT_WIDTHS)) + ")")
    parser.add_argument("--rows", type=positive(int), default=DEFAULT_ROWS, help="rows of the block's input")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the block (default: float32)")
    parser.add_argument("--train", action="store_true", help="the route of a training step (default: forward)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda where there is one, else cpu; with --model, the model's)")
    parser.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                        help="the route of each block of the model that MODULE.FACTORY() returns (default: none)")
    args = parser.parse_args(argv)
    if args.model is not None and (args.width is not None or args.dtype is not None):
        parser.error("--model takes each block's own widths and dtype: leave out --width and --dtype")
    args.device_given = args.device is not None
    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.device = torch.device(text)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for CUDA on a CPU build
        parser.error(f"--device {text!r} is not usable here: {e}")
    if args.model is not None:
        try:
            args.model = load_model(args.model)
        except ValueError as e:
            parser.error(f"--model {e}")
    return args


def report(args: argparse.Namespace) -> list[str]:
    device = args.device
    if args.model is not None:
        first = next(iter(args.model.parameters()), None)
        device = first.device if first is not None and not args.device_given else device
    lines = [*versions(), *device_lines(device), *table_lines(device)]
    if args.model is not None:
        lines += model_lines(args.model, args.rows, args.train)
    else:
        dtype = DTYPES[args.dtype or "float32"]
        lines += shape_lines(args.width or list(DEFAULT_WIDTHS), args.rows, dtype, device, args.train)
    return lines


def main(argv: list[str] | None = None) -> int:
    print("\n".join(report(parse_args(argv))))
    return 0
