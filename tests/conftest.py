"""Shared fixtures: one tolerance table, a verbose comparison helper, reference/fused pairs, backends."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It is chosen when a kernel is decorated,
# so this must happen before fused_residual.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_residual as fr  # noqa: E402
from fused_residual import backends, dispatch  # noqa: E402
from fused_residual.activations import REFERENCE_FORM  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fused_residual")
    group.addoption("--fuzz-cases", type=int, default=320, metavar="N",
                    help="cases of tests/test_fuzz.py, drawn from --fuzz-seed (default: 320)")
    group.addoption("--fuzz-seed", type=int, default=0, metavar="S",
                    help="seed of the fuzz cases; the same seed draws the same cases (default: 0)")


# (atol, rtol) for a result in `dtype` compared with a float64 computation of the same math.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 4e-2),
}

HAS_CUDA = torch.cuda.is_available()
TRITON_INSTALLED = backends.missing_requirement("triton") is None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor",
                 dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """``actual`` (any dtype) vs ``expected`` (float64) with the tolerance of ``dtype`` (default: actual's).

    ``scale`` widens the tolerance for sums over many terms. On failure, says how many elements are off and
    where the worst one is.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = atol * scale, rtol * scale
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
    bad = ~(((a - e).abs() <= atol + rtol * e.abs()) | same_nonfinite)
    if bad.any():
        err = torch.where(bad, (a - e).abs().nan_to_num(float("inf")), torch.zeros_like(a))
        worst = divmod(int(err.argmax()), a.shape[-1]) if a.dim() >= 2 else int(err.argmax())
        raise AssertionError(
            f"{name} ({dtype}, atol={atol:.1e}, rtol={rtol:.1e}): {int(bad.sum())} of {a.numel()} elements "
            f"differ; worst at {worst}: {a.flatten()[int(err.argmax())]!r} vs {e.flatten()[int(err.argmax())]!r}"
        )


# Half-width of the band around 0 in which a ReLU decision is a matter of rounding (see block_reference).
RELU_TIE_BAND = {torch.float64: 0.0, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def block_reference(block: fr.FusedResidualBlock, x: torch.Tensor, dout: torch.Tensor):
    """Float64 output and gradients of ``block``'s math, written out here with plain ops.

    A ReLU's gradient jumps at 0, so in low precision a pre-activation within rounding of 0 can land on either
    side (in PyTorch's own eager block as much as in a fused one) and flip the gradient of a whole row. Only
    for pre-activations within ``RELU_TIE_BAND[dtype]`` of 0 does the expectation follow the decision the fused
    kernels made (read from their own ``h`` and ``out``); everywhere else it is the float64 one.
    """
    dtype = x.dtype
    band = RELU_TIE_BAND[dtype]
    x2d = x.reshape(-1, x.shape[-1])
    params = dict(block.named_parameters())
    with torch.no_grad():
        w1, ws = params["linear1.weight"], params.get("shortcut.weight")
        chosen = dispatch.route(x2d, w1, ws, REFERENCE_FORM, True)
        backend = chosen.backend or backends.get("torch")
        variant = dispatch.kernel_variants(chosen, x2d, w1, ws, REFERENCE_FORM, None)[0]
        out_lp, h_lp = backend.block_forward(x2d, w1, params["linear1.bias"], params["linear2.weight"],
                                             params["linear2.bias"], ws, REFERENCE_FORM, save=True, variant=variant)
    p64 = {name: t.detach().double().requires_grad_(True) for name, t in params.items()}
    x64 = x2d.detach().double().requires_grad_(True)
    pre1 = x64 @ p64["linear1.weight"].t() + p64["linear1.bias"]
    h = pre1 * torch.where(pre1.abs() <= band, h_lp.double() > 0, pre1 > 0)
    shortcut = x64 @ p64["shortcut.weight"].t() if "shortcut.weight" in p64 else x64
    pre2 = h @ p64["linear2.weight"].t() + p64["linear2.bias"] + shortcut
    out = pre2 * torch.where(pre2.abs() <= band, out_lp.double() > 0, pre2 > 0)
    out.backward(dout.reshape(out.shape).double())
    grads = {"x": x64.grad.view(x.shape)}
    grads.update({name: t.grad for name, t in p64.items()})
    return out.detach().view(*x.shape[:-1], out.shape[-1]), grads


def device_params():
    """pytest params for each device: cpu always, cuda marked and skipped where there is none."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                   pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])]


def backend_choices() -> list[str]:
    """Every registered backend whose packages are installed, and each of its non-default kernel variants
    (``name:variant``): what the parity tests run."""
    choices = []
    for name in backends.names():
        if backends.missing_requirement(name) is None:
            choices.append(name)
            choices += [f"{name}:{variant}" for variant in backends.get(name).VARIANTS[1:]]
    return choices


@pytest.fixture
def use_backend(monkeypatch):
    """``use_backend(choice)`` sets FUSED_RESIDUAL_BACKEND for one test: ``"auto"``, ``"composite"``, a backend's
    name or ``name:variant``."""

    def set_backend(name: str) -> None:
        if name.startswith("triton") and not TRITON_INSTALLED:
            pytest.skip("triton is not installed")
        monkeypatch.setenv(dispatch.ENV_VAR, name)
        dispatch.reset()

    yield set_backend
    dispatch.reset()


@pytest.fixture
def fake_gpu_device(monkeypatch):
    """``fake_gpu_device(capability, gfx=None, name=...)``: CUDA devices read as a GPU of this compute capability
    (an AMD one of gfx architecture ``gfx`` under a ROCm torch where given), through the torch queries
    ``kernels/_common.py`` makes; returns its family. No GPU is needed: only what the package asks is faked."""
    from types import SimpleNamespace

    from fused_residual.kernels import _common

    cached = (_common.family, _common.capability, _common.max_shared_memory, _common.multiprocessors)

    def forget():
        for fact in cached:
            fact.cache_clear()
        dispatch.reset()

    def fake(capability: tuple[int, int], gfx: str | None = None, name: str = "Fake GPU"):
        properties = SimpleNamespace(gcnArchName=f"{gfx}:sramecc+:xnack-" if gfx else "", major=capability[0],
                                     minor=capability[1], multi_processor_count=100, name=name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.version, "hip", "6.4.0" if gfx else None)
        monkeypatch.setattr(_common, "_triton_arch", lambda backend: None)  # no Triton driver asked
        forget()
        return _common.family(torch.device("cuda", 0))

    yield fake
    forget()


def seeded_pair(in_features: int, out_features: int, seed: int = 0, **factory):
    """(reference ResidualBlock, FusedResidualBlock) built from the same seed: identical parameters."""
    torch.manual_seed(seed)
    reference = fr.ResidualBlock(in_features, out_features).to(**factory)
    torch.manual_seed(seed)
    # Built in float32 then cast, like the reference: a seed gives other values when init runs in float64.
    fused = fr.FusedResidualBlock(in_features, out_features).to(**factory)
    return reference, fused


class ProjectionReference(torch.nn.Module):
    """The projection block written with plain PyTorch ops: ``relu(linear2(relu(linear1(x))) + shortcut(x))``."""

    def __init__(self, block: fr.FusedResidualBlock) -> None:
        super().__init__()
        self.linear1, self.linear2, self.shortcut = block.linear1, block.linear2, block.shortcut

    def forward(self, x):
        return torch.relu(self.linear2(torch.relu(self.linear1(x))) + self.shortcut(x))


def to_reference(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` in which every fused module is replaced by its plain-PyTorch reference.

    Parameter names are kept, so gradients can be compared by name. The code under test never computes the
    expected values.
    """
    import copy

    module = copy.deepcopy(module)

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if isinstance(m, fr.FusedResidualBlock):
            if m.projection:
                return ProjectionReference(m)
            ref = fr.ResidualBlock(m.in_features, m.out_features).to(m.linear1.weight.device)
            ref.linear1, ref.linear2 = m.linear1, m.linear2
            return ref
        if isinstance(m, fr.FusedResidualNet):
            ref = fr.ResidualNet(1, 1, 1, 0)
            ref.linear1, ref.linear2 = m.linear1, m.linear2
            ref.blocks = torch.nn.ModuleList(convert(b) for b in m.blocks)
            return ref
        for name, child in list(m.named_children()):
            setattr(m, name, convert(child))
        return m

    return convert(module)


def float64_reference(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor):
    """Output and gradients (input, then each parameter by name) of the reference form of ``module`` in float64."""
    ref = to_reference(module).double()
    assert not any(isinstance(m, (fr.FusedResidualBlock, fr.FusedResidualNet)) for m in ref.modules())
    xr = x.detach().double().requires_grad_(True)
    out = ref(xr)
    out.backward(dout.double())
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in ref.named_parameters()})
    return out.detach(), grads


def run_with_grads(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor):
    xr = x.detach().clone().requires_grad_(True)
    out = module(xr)
    out.backward(dout)
    grads = {"x": xr.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def _language_objects() -> tuple:
    try:
        import triton.language as tl
    except ImportError:
        return ()
    return tuple(o for o in (tl, tl.core, getattr(tl, "math", None), tl.tensor, getattr(tl, "condition", None),
                             tl.dtype, getattr(tl.core, "tensor_descriptor_base", None)) if o is not None)


@pytest.fixture(autouse=True)
def _restore_triton_language():
    """Triton's interpreter patches ``triton.language`` to run a jit function called from another one
    (``JITFunction`` device calls, e.g. our activations and reductions) and never restores it: a later real
    compile in the same process (the AOT and launch-cache tests) then fails, but only with an empty Triton cache,
    as on a fresh CI machine. Put every attribute back after each test."""
    saved = [(obj, dict(vars(obj))) for obj in _language_objects()]
    yield
    for obj, before in saved:
        now = vars(obj)
        for name in [n for n in now if n not in before]:
            delattr(obj, name)
        for name, value in before.items():
            if now.get(name, _ABSENT) is not value:
                setattr(obj, name, value)


_ABSENT = object()
