"""Device facts come from one module, ``kernels/_common.py``, read through it at call time.

Whether a device runs compiled Triton kernels (``is_gpu``), its capability, SMs, shared memory, the launch device
and where launch scratch goes are decided there and nowhere else in ``kernels/`` or the Triton backend. Callers
read them as ``_common.name(...)``, so replacing one attribute of ``_common`` (as a host-time benchmark does to
send meta tensors down the GPU branch) reaches every wrapper: checked from the sources, then by running the
wrappers on meta tensors with ``_common.is_gpu`` replaced and the CUDA entry points it leads to stubbed.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fused_residual import backends

ROOT = Path(__file__).resolve().parents[1]
# The files that launch kernels or decide whether they run: every device test there must go through _common.
CALLERS = sorted((ROOT / "kernels").glob("*.py")) + [ROOT / "fused_residual" / "backends" / "triton_backend.py"]
DEVICE_FACTS = {"is_gpu", "capability", "family", "max_shared_memory", "launch_device", "current_gpu",
                "input_precision", "multiprocessors", "on_interpreter", "interpreter_enabled"}
# What a device is (not which stream or device is current now, which the GPU branch reads per launch).
CUDA_QUERIES = {"get_device_capability", "get_device_properties", "get_device_name", "device", "is_available"}


def _device_tests(path: Path) -> list[str]:
    """Places in ``path`` that test or query a device themselves instead of asking ``_common``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr == "is_cuda":
            found.append(f"{where} .is_cuda")
        elif isinstance(node, ast.Constant) and node.value == "cuda":
            found.append(f"{where} the string 'cuda'")
        elif (isinstance(node, ast.Attribute) and node.attr in CUDA_QUERIES and isinstance(node.value, ast.Attribute)
              and node.value.attr == "cuda"):
            found.append(f"{where} torch.cuda.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("_common"):
            # A name imported from _common is bound once: a later replacement of the module's attribute misses it.
            found += [f"{where} imports {a.name} by name" for a in node.names if a.name in DEVICE_FACTS]
    return found


@pytest.mark.parametrize("path", CALLERS, ids=lambda p: p.name)
def test_device_facts_are_read_only_through_the_common_module(path):
    if path.name == "_common.py":
        pytest.skip("the device-facts module itself")
    assert not _device_tests(path)


needs_triton = pytest.mark.skipif(backends.missing_requirement("triton") is not None,
                                  reason="triton is not installed")


@pytest.fixture
def meta_is_a_gpu(monkeypatch):
    """``_common.is_gpu`` replaced so that meta tensors take the GPU branch, with the CUDA entry points that branch
    reads stubbed (an sm_86 card with 46 SMs); returns the devices ``torch.cuda.device`` was entered with."""
    from fused_residual.kernels import _common

    entered = []
    monkeypatch.setattr(_common, "is_gpu", lambda device: device.type in ("cuda", "meta"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        multi_processor_count=46))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(entered.append(device)))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    for cached in (_common.capability, _common.family, _common.multiprocessors, _common.max_shared_memory):
        cached.cache_clear()
    yield entered
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    for cached in (_common.capability, _common.family, _common.multiprocessors, _common.max_shared_memory):
        cached.cache_clear()


@needs_triton
def test_one_replaced_attribute_sends_meta_tensors_down_the_gpu_branch(monkeypatch, meta_is_a_gpu):
    from fused_residual.kernels import _common, fused_linear, whole_block

    from fused_residual.backends import triton_backend

    meta = torch.device("meta")
    assert _common.capability(meta) == (8, 6) and _common.multiprocessors(meta) == 46
    assert _common.input_precision(torch.empty(2, 2, device=meta)) == "tf32"
    assert triton_backend.unavailable(meta, torch.float16, triton_backend.REFERENCE_FORM) is None
    # sm_86: the whole-block backward stops at width 32 (sm_90 and the interpreter: 128).
    x, w = torch.empty(8, 64, device=meta, dtype=torch.float16), torch.empty(64, 64, device=meta, dtype=torch.float16)
    assert not triton_backend.whole_block_backward_fits(x, w, None)
    assert triton_backend.whole_block_backward_fits(x[:, :32], w[:32, :32], None)

    launches = []
    monkeypatch.setattr(fused_linear, "_launch_tuned", lambda grid, *args, **flags: launches.append(
        (grid({"BLOCK_M": 64, "BLOCK_N": 64, "PERSISTENT": True}), flags)))
    monkeypatch.setattr(whole_block, "_launch_forward_tuned", lambda grid, *args, **flags: launches.append(
        (grid({"BLOCK_M": 64, "PROGRAMS_PER_SM": 1}), flags)))
    a = torch.empty(4096, 64, device=meta)
    fused_linear.fused_linear(a, w.float().t(), bias=torch.empty(64, device=meta), activation="relu")
    whole_block.forward(a, w.float(), None, w.float(), None, store_saved=False)
    (linear_grid, linear_flags), (block_grid, block_flags) = launches
    # Autotuned (not the interpreter's fixed config), TF32 as on a GPU, no TMA on sm_86, persistent grids sized
    # by the stubbed 46 SMs, both launched inside torch.cuda.device(meta).
    assert linear_flags["INPUT_PRECISION"] == block_flags["INPUT_PRECISION"] == "tf32"
    assert linear_flags["TMA_LAYOUT"] == ""
    assert linear_grid == (46, 1) and block_grid == (46,)
    assert meta_is_a_gpu == [meta, meta]


def test_a_replay_reads_the_current_device_and_capture_state_through_the_c_functions_torch_calls(monkeypatch):
    """``torch.cuda.current_device`` (Triton's driver getter under torch) is read through the C function it calls
    only once CUDA is initialized (before, its ``_lazy_init`` has work to do); any other getter is kept as it is.
    ``is_current_stream_capturing`` is read through the C function that is its body."""
    from fused_residual.kernels import _common

    def c_get_device():
        return 3

    monkeypatch.setattr(torch._C, "_cuda_getDevice", c_get_device, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert _common.current_device_reader(torch.cuda.current_device) is torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert _common.current_device_reader(torch.cuda.current_device) is c_get_device
    other = SimpleNamespace(get=lambda: 0).get
    assert _common.current_device_reader(other) is other

    def c_capturing():
        return True

    monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", c_capturing)
    assert _common.capture_check() is c_capturing and torch.cuda.is_current_stream_capturing() is True
    replaced = SimpleNamespace(check=lambda: False).check  # a replaced torch function: kept as it is
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", replaced)
    assert _common.capture_check() is replaced
