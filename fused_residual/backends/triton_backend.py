"""The ``triton`` backend: the block's forward and backward as fused-epilogue GEMM kernels.

Same contract, saved tensors and semantics as ``torch_backend``, for every ``Form`` (activation relu, gelu,
gelu_tanh or silu; final ReLU or none) and any hidden width. Each function is one whole-block launch where the
variant allows it, else a short sequence of ``kernels.fused_linear`` launches (the kernel files document the
math, bytes and grid). ``act`` is the hidden activation, ``final`` ReLU or nothing, ``saved`` what backward keeps
of the hidden layer (``h`` for ReLU, the pre-activation ``pre`` for the others):

forward   h   = act(x W1^T + b1)                        bias + activation epilogue (+ pre stored, training)
          out = final(h W2^T + b2 + x)                  bias + residual + final epilogue
                final([h | x] [W2 | Ws]^T + b2)         projection: the shortcut joins the GEMM along K
backward  g2  = dout * (out > 0)                        never written: applied on load by each launch below
                                                        (no final ReLU: g2 = dout)
          g1  = (g2 W2) * act'(saved)                   mask on A, activation-gradient epilogue
          dx  = g1 W1 + g2        | [g2 | g1] [Ws; W1]  mask on the residual | mask on A, second operand
          dW2 = g2^T act(saved), db2 = rows of g2^T     split-K GEMM, mask on A, act on B's load (not ReLU),
                                                        fused row sums, summed inside the launch (deterministic)
          dW1 = g1^T x, db1 = rows of g1^T              same;  dWs = g2^T x

A training step is 2 + 4 launches (projection: 2 + 5), the whole block 1 + 1, and nothing else but allocations.
Zero-size batches return before any launch.

Each computation is written once, as the steps of a launch plan (``kernels/_plan.py``, the launches recorded by
``kernels/_plan_launches.py``): the ``plan_*`` functions run the call through a ``Recorder`` and return its result
with the recorded ``Steps``, which ``fused_residual/plans.py`` replays for later calls of the same signature; the
contract's plain functions are the first half of that.

Autocast (``x`` and ``dout`` wider than the weights): every kernel reads them once in their own dtype, rounds them
on chip for its GEMMs, adds the shortcut un-rounded and writes ``out`` in ``Form.output_dtype``'s dtype and ``dx``
in ``x``'s: no rounded copy, no cast pass.

Variants: ``"whole_block"`` runs the whole-block kernels (``kernels/whole_block.py``), ``"two_gemm"`` (and None)
the fused-linear kernels; the backend runs the variant it is told (``dispatch.kernel_variants`` decides, from
``takes``). The whole-block kernels take the block when: identity shortcut, ``w1`` square, a "light" hidden
activation (the registry's ``register_class``: ReLU; either final activation; the "heavy" ones spill registers
there beyond width 16 in backward and at width 128 on sm_80 in forward), and the width padded to a power of two
>= 16 at most ``max_forward_width(element sizes)`` (forward, 256: the weights on chip to 128 in 16-bit and 64 in
fp32, streamed from L2 beyond; also at least one candidate config whose shared-memory bound fits the device's opt-in
shared memory per block, ``whole_block_configs.runnable_forward_configs``) or ``max_backward_width(device
family)`` (backward, per family: 128 on Hopper; not an fp32 ``dout`` next to 16-bit weights, the FFN form under
autocast). A device of no known family gets neither (the two-GEMM kernels with small classic tiles). ``auto``
takes them only where a dispatch table or the conservative rule says so (``dispatch.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import signs as signs_
from ..activations import REFERENCE_FORM, Form
from ..kernels import _common, whole_block_configs, whole_net
from ..kernels import _plan_launches as recorded
from ..kernels._plan import NONE, ROWS, Recorder
from ..kernels._signs import row_bytes
from ..kernels.fused_linear import fused_linear

NAME = "triton"
VARIANTS = ("whole_block", "two_gemm")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_relu_backward = torch.ops.aten.threshold_backward


def unavailable(device: torch.device, dtype: torch.dtype, form: Form) -> str | None:
    if dtype not in DTYPES:
        return f"the kernels take float16, bfloat16 or float32, not {dtype}"
    if _common.is_gpu(device):
        return None
    if _common.on_interpreter(device):
        if dtype == torch.bfloat16:  # (also a CPU autocast to bfloat16: the weights are cast before routing)
            return ("bfloat16 on Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): its tl.dot computes "
                    "bfloat16 wrongly; use float16 or float32 there, or a GPU")
        return None
    if device.type == "cpu":
        return "the tensors are on the CPU; the Triton kernels run there only under TRITON_INTERPRET=1"
    return f"the Triton kernels do not support device type {device.type!r}"


def takes(variant: str, x: Tensor, w1: Tensor, ws: Tensor | None, form: Form, grad_dtype: torch.dtype | None) -> bool:
    """Whether ``variant`` computes the block's forward (``grad_dtype`` None) or its backward for a gradient of
    ``grad_dtype``: the two-GEMM kernels take every call, the whole-block ones their shapes and widths."""
    if variant != "whole_block":
        return True
    if grad_dtype is None:
        return whole_block_forward_fits(x, w1, ws, form)
    return _whole_block_shape(x, w1, ws, form) and _backward_fits(x.shape[-1], torch.finfo(grad_dtype).bits // 8,
                                                                   w1.element_size(), x.device)


def _whole_block_shape(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form) -> bool:
    """The block has the shape the whole-block kernels take: identity shortcut, square w1, a light hidden
    activation."""
    return ws is None and w1.shape[0] == w1.shape[1] == x.shape[-1] and form.hidden.register_class == "light"


def whole_block_forward_fits(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form = REFERENCE_FORM) -> bool:
    if not _whole_block_shape(x, w1, ws, form):
        return False
    return bool(whole_block_configs.runnable_forward_configs(
        whole_block_configs.padded_width(x.shape[-1]), w1.element_size(), x.element_size(),
        _common.family(x.device).name, _common.max_shared_memory(x.device)))


def whole_block_backward_fits(dout: Tensor, w1: Tensor, ws: Tensor | None, form: Form = REFERENCE_FORM) -> bool:
    return _whole_block_shape(dout, w1, ws, form) and _backward_fits(dout.shape[-1], dout.element_size(),
                                                                      w1.element_size(), dout.device)


def _backward_fits(width: int, grad_size: int, weight_size: int, device: torch.device) -> bool:
    return (whole_block_configs.takes_dout(grad_size, weight_size) and whole_block_configs.padded_width(width)
            <= whole_block_configs.max_backward_width(_common.family(device).name))


def _output_dtype(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form) -> torch.dtype:
    """The block's output dtype: the weights', or under autocast (``x`` wider) what ``Form.output_dtype`` says."""
    return w1.dtype if x.dtype == w1.dtype else form.output_dtype(x.dtype, w1.dtype, ws is not None)


def _vector(rec: Recorder, name: str) -> str | None:
    """A bias the kernels read with unit stride: the register itself, or a copy of a strided one (N elements)."""
    b = rec[name]
    if b is None:
        return None
    if b.stride(0) == 1:
        return name
    rec.call(f"{name}.contiguous", Tensor.contiguous, name)
    return f"{name}.contiguous"


def linear(x: Tensor, w: Tensor, b: Tensor | None, activation: str | None = None) -> Tensor:
    """``act(x @ w.T + b)``, any activation of the registry or none."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return fused_linear(x, w.t(), bias=b if b is None or b.stride(0) == 1 else b.contiguous(),
                        activation=activation)[0]


# ---- the block ---------------------------------------------------------------------------------------------

def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None, form: Form,
    *, save: bool, variant: str | None = None, signs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(out, saved)`` of the block; see ``Backend.block_forward``. ``saved`` may be None when not ``save``.
    Under autocast ``x`` is read once in its own dtype by the kernels (rounded on chip for the GEMMs, added
    un-rounded as the shortcut): no rounded copy."""
    return plan_block_forward(x, w1, b1, w2, b2, ws, form, save=save, variant=variant, signs=signs)[0]


def plan_block_forward(x, w1, b1, w2, b2, ws, form, *, save, variant=None, signs=False):
    """``block_forward``'s result and the steps that compute it for later calls of the same signature."""
    out_dtype = _output_dtype(x, w1, ws, form)
    if x.shape[0] == 0:
        kept = (x.new_empty((0, signs_.row_bytes(w2.shape[0])), dtype=torch.uint8) if signs
                else x.new_empty((0, w1.shape[0]), dtype=w1.dtype))
        return (x.new_empty((0, w2.shape[0]), dtype=out_dtype), kept), None
    rec = Recorder({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "ws": ws}, x.device)
    b1_, b2_ = _vector(rec, "b1"), _vector(rec, "b2")
    final = form.final_activation
    signs = signs and final == "relu"
    if variant == "whole_block":
        saved = "saved" if save or signs else NONE
        recorded.whole_block_forward(rec, "out", None if saved == NONE else saved, "x", "w1", b1_, "w2", b2_,
                                     activation=form.activation, final_relu=final == "relu", out_dtype=out_dtype,
                                     store_signs=signs)
    else:
        act = form.hidden
        pre = None
        if save and not act.from_output:
            pre = "pre"
            rec.empty(pre, (ROWS, w1.shape[0]), w1.dtype)
        recorded.fused_linear(rec, "h", "x", ("w1", True), bias=b1_, activation=act.name, pre_out=pre,
                              out_dtype=w1.dtype)
        if signs:  # the final ReLU's packed sign bits, written by the launch that writes out
            rec.empty("signs", (ROWS, row_bytes(w2.shape[0])), torch.uint8)
        second = {"residual": "x"} if ws is None else {"second": ("x", ("ws", True))}
        recorded.fused_linear(rec, "out", "h", ("w2", True), bias=b2_, activation=final, out_dtype=out_dtype,
                              signs_out="signs" if signs else None, **second)
        saved = "signs" if signs else "h" if act.from_output else (pre or NONE)
    results = ("out", saved)
    return tuple(rec[r] for r in results), rec.steps_for(results)


def block_backward(
    dout: Tensor, x: Tensor | None, saved: Tensor | None, out: Tensor | None, w1: Tensor, w2: Tensor,
    ws: Tensor | None, b1: Tensor | None, signs: Tensor | None, form: Form, needs: tuple[bool, ...], *,
    dx_dtype: torch.dtype, variant: str | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dw1, db1, dw2, db2, dws)``; see ``Backend.block_backward``. ``g2 = dout * (out > 0)`` is
    never written: each launch that reads it applies the mask on load."""
    return plan_block_backward(dout, x, saved, out, w1, w2, ws, b1, signs, form, needs, dx_dtype=dx_dtype,
                               variant=variant)[0]


def plan_block_backward(dout, x, saved, out, w1, w2, ws, b1, signs, form, needs, *, dx_dtype, variant=None):
    """``block_backward``'s result and the steps that compute it for later calls of the same signature."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    need_weights = need_w1 or need_b1 or need_w2 or need_b2
    final_relu = form.final_activation == "relu"
    if dout.shape[0] == 0:  # an empty batch: zero weight gradients, no launch
        return _empty_block_grads(dout, w1, w2, ws, needs, dx_dtype), None
    rec = Recorder({"dout": dout, "x": x, "saved": saved, "out": out, "w1": w1, "w2": w2, "ws": ws, "b1": b1,
                    "signs": signs}, dout.device)
    act = form.hidden
    bits = final_relu and out is None  # a recompute block's final ReLU: its packed sign bits
    mask = ("signs" if bits else "out") if final_relu else None
    if variant == "whole_block" and (need_x or need_weights):
        recorded.whole_block_backward(rec, "dout", mask, None if saved is None else "saved",
                                      "x" if x is not None else None, "w1", "w2", need_dx=need_x,
                                      need_weights=need_weights, activation=form.activation, final_relu=final_relu,
                                      dx_dtype=dx_dtype, sign_bits=bits, b1=_vector(rec, "b1"))
        results = tuple(name if need else NONE for name, need in zip(
            ("dx", "dw1", "db1", "dw2", "db2"), (need_x, need_w1, need_b1, need_w2, need_b2), strict=True)) + (NONE,)
        return tuple(rec[r] for r in results), rec.steps_for(results)
    saved_name = "saved"
    if saved is None:  # a recompute block: its hidden layer again, one launch
        saved_name = "hidden"
        recorded.fused_linear(rec, saved_name, "x", ("w1", True), bias=_vector(rec, "b1"),
                              activation=act.name if act.from_output else None, out_dtype=w1.dtype)
    # Under autocast dout and x may be wider than the weights: each launch rounds them on chip for its GEMM.
    on_a = {"relu_mask": mask, "mask_bits": 1 if bits else 0}  # dout's mask as the GEMM's A (rows on m)
    dw2, db2 = _weight_grad(rec, "dw2", "dout", mask, bits, saved_name, need_w2, need_b2, w2.dtype,
                            None if act.from_output else act.name)
    dws = _weight_grad(rec, "dws", "dout", mask, bits, "x", True, False, ws.dtype)[0] if need_ws else NONE
    dx = dw1 = db1 = NONE
    if need_x or need_w1 or need_b1:
        recorded.fused_linear(rec, "g1", "dout", "w2", gate=saved_name, gate_activation=act.name, out_dtype=w1.dtype,
                              **on_a)
        dw1, db1 = _weight_grad(rec, "dw1", "g1", None, False, "x", need_w1, need_b1, w1.dtype)
        if need_x:
            dx = "dx"
            if ws is None:
                recorded.fused_linear(rec, dx, "g1", "w1", residual="dout", mask_on="residual", out_dtype=dx_dtype,
                                      **on_a)
            else:
                recorded.fused_linear(rec, dx, "dout", "ws", second=("g1", "w1"), out_dtype=dx_dtype, **on_a)
    results = (dx, dw1, db1, dw2, db2, dws)
    return tuple(rec[r] for r in results), rec.steps_for(results)


def _empty_block_grads(dout, w1, w2, ws, needs, dx_dtype):
    shapes = ((0, w1.shape[1]), w1.shape, w1.shape[:1], w2.shape, w2.shape[:1], None if ws is None else ws.shape)
    grads = [w1.new_zeros(shape) if need else None for shape, need in zip(shapes, needs, strict=True)]
    if needs[0]:
        grads[0] = dout.new_empty(shapes[0], dtype=dx_dtype)
    return tuple(grads)


def _weight_grad(rec: Recorder, name: str, g: str, relu_out: str | None, bits: bool, a: str, need_w: bool,
                 need_b: bool, dtype: torch.dtype, a_activation: str | None = None) -> tuple[str, str]:
    """Registers ``(g'^T act(a), column sums of g')``, each only if asked (NONE otherwise), in ``dtype``, where
    ``g' = g * (relu_out > 0)`` (the mask applied on load; ``bits``: ``relu_out`` names its packed sign bits) or
    ``g``, and ``act`` is ``a_activation`` applied on load (or none): one launch, split-K reduced inside it."""
    g_t, a_t = rec[g], rec[a]
    if not need_w or g_t.shape[1] == 0 or a_t.shape[1] == 0:
        # No GEMM to run: the bias without its weight (e.g. frozen weights), or a weight with no elements (a
        # zero-size layer): a plain reduction.
        dw = NONE
        if need_w:
            dw = f"{name}.zeros"
            rec.call(dw, _zeros, (g_t.shape[1], a_t.shape[1]), dtype, rec.device)
        if not need_b:
            return dw, NONE
        if relu_out is not None:
            if bits:
                rec.call(f"{name}.masked", signs_.relu_backward, g, relu_out)
            else:
                rec.call(f"{name}.masked", _relu_backward, g, relu_out, 0)
            g = f"{name}.masked"
        rec.call(f"{name}.bias", _row_sums, g, dtype)
        return dw, f"{name}.bias"
    split = recorded.split_k_slices(g_t.shape[1], a_t.shape[1], _common.multiprocessors(rec.device))
    # The mask of A = g^T: Q = relu_out^T, or the bits of relu_out with its rows on the GEMM's k axis.
    mask = None if relu_out is None else relu_out if bits else (relu_out, True)
    recorded.fused_linear(rec, name, (g, True), a, rows_in="k", relu_mask=mask, mask_bits=2 if bits else 0,
                          b_activation=a_activation, rowsum=f"{name}.rowsum" if need_b else None, split_k=split,
                          out_dtype=dtype)
    return name, (f"{name}.rowsum" if need_b else NONE)


def _row_sums(g: Tensor, dtype: torch.dtype) -> Tensor:
    return g.sum(0, dtype=torch.float32).to(dtype)


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


# ---- the single fused layer --------------------------------------------------------------------------------

def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)`` in ``promote(h, residual)``'s dtype (the residual read un-rounded)."""
    return plan_linear_residual_relu_forward(h, w, b, residual)[0][0]


def plan_linear_residual_relu_forward(h, w, b, residual):
    """``(out,)`` and the steps that compute it for later calls of the same signature."""
    out_dtype = torch.promote_types(h.dtype, residual.dtype)
    if h.shape[0] == 0:
        return (h.new_empty((0, w.shape[0]), dtype=out_dtype),), None
    rec = Recorder({"h": h, "w": w, "b": b, "residual": residual}, h.device)
    recorded.fused_linear(rec, "out", "h", ("w", True), bias=_vector(rec, "b"), residual="residual", activation="relu",
                       out_dtype=out_dtype)
    return (rec["out"],), rec.steps_for(("out",))


def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, bool, bool, bool], *,
    dh_dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dh, dw, db, dresidual)``; see ``torch_backend.linear_residual_relu_backward``. The ReLU mask is
    applied on load, unless the residual's gradient (``dout * (out > 0)`` itself) is asked for anyway."""
    return plan_linear_residual_relu_backward(dout, h, out, w, needs, dh_dtype=dh_dtype)[0]


def plan_linear_residual_relu_backward(dout, h, out, w, needs, *, dh_dtype):
    """``linear_residual_relu_backward``'s result and the steps that compute it for later calls."""
    if dout.shape[0] == 0:
        zeros = (w.new_zeros(w.shape) if needs[1] else None, w.new_zeros(w.shape[:1]) if needs[2] else None)
        return (dout.new_empty((0, w.shape[1]), dtype=dh_dtype) if needs[0] else None, *zeros,
                dout.new_empty(dout.shape) if needs[3] else None), None
    rec = Recorder({"dout": dout, "h": h, "out": out, "w": w}, dout.device)
    if needs[3]:
        rec.call("g", _relu_backward, "dout", "out", 0)
        g, relu_out = "g", None
    else:
        g, relu_out = "dout", "out"
    dh = NONE
    if needs[0]:
        dh = "dh"
        recorded.fused_linear(rec, dh, g, "w", relu_mask=relu_out, out_dtype=dh_dtype)
    dw, db = _weight_grad(rec, "dw", g, relu_out, False, "h", needs[1], needs[2], w.dtype)
    results = (dh, dw, db, g if needs[3] else NONE)
    return tuple(rec[r] for r in results), rec.steps_for(results)


# ---- the net (inference, no plan) --------------------------------------------------------------------------

def takes_net(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor, b_out: Tensor | None,
) -> bool:
    """The whole-net kernel takes nets with every bias and every padded width within its on-chip limit."""
    hidden = w_in.shape[0]
    has_biases = b_in is not None and b_out is not None and all(
        b1 is not None and b2 is not None and w1.shape[0] == hidden for w1, b1, _, b2 in blocks)
    return has_biases and whole_net.fits(x.shape[1], w_in.shape[0], w_out.shape[0], x.element_size(),
                                         _common.family(x.device).name)


def net_forward(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor, b_out: Tensor | None,
) -> Tensor:
    """The whole net in one launch (where ``dispatch.net_as_one`` sends it: ``takes_net``). Block parameters are
    stacked per call: a few small copies, no activations."""
    hidden = w_in.shape[0]
    if blocks:
        w1, b1, w2, b2 = (torch.stack(ts) for ts in zip(*blocks, strict=True))
    else:
        w1 = w2 = x.new_empty((0, hidden, hidden))
        b1 = b2 = x.new_empty((0, hidden))
    vector = [b if b is None or b.stride(0) == 1 else b.contiguous() for b in (b_in, b_out)]
    return whole_net.forward(x, w_in, vector[0], w1, b1, w2, b2, w_out, vector[1])
