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

Autocast (``x`` and ``dout`` wider than the weights): every kernel reads them once in their own dtype, rounds them
on chip for its GEMMs, adds the shortcut un-rounded and writes ``out`` in ``Form.output_dtype``'s dtype and ``dx``
in ``x``'s: no rounded copy, no cast pass.

Variants: ``"whole_block"`` (the default) takes the whole-block kernels (``kernels/whole_block.py``) wherever
they take the block, ``"two_gemm"`` never. They take it when: identity shortcut, ``w1`` square, ReLU as the hidden
activation (either final activation; the smooth activations spill registers there beyond width 16 in backward and
at width 128 on sm_80 in forward), and the width padded to a power of two >= 16 at most
``max_forward_width(element sizes)`` (forward, 256: the weights on chip to 128 in 16-bit and 64 in fp32, streamed
from L2 beyond; also at least one candidate config whose shared-memory bound fits the device's opt-in shared memory
per block, ``whole_block.runnable_forward_configs``) or ``max_backward_width(device capability)`` (backward, 128 on
sm_90 and 32 before; not an fp32 ``dout`` next to 16-bit weights, the FFN form under autocast). ``auto`` takes
them only where a dispatch table or the conservative rule says so (``dispatch.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import signs as signs_
from ..activations import SEED_FORM, Form
from ..kernels import whole_block, whole_net
from ..kernels._common import capability, interpreter_enabled, max_shared_memory, multiprocessors
from ..kernels.fused_linear import fused_linear

NAME = "triton"
VARIANTS = ("whole_block", "two_gemm")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_relu_backward = torch.ops.aten.threshold_backward


def unavailable(device: torch.device, dtype: torch.dtype, form: Form) -> str | None:
    if dtype not in DTYPES:
        return f"the kernels take float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not interpreter_enabled():
            return "the tensors are on the CPU; the Triton kernels run there only under TRITON_INTERPRET=1"
        if dtype == torch.bfloat16:  # (also a CPU autocast to bfloat16: the weights are cast before routing)
            return ("bfloat16 on Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): its tl.dot computes "
                    "bfloat16 wrongly; use float16 or float32 there, or a GPU")
        return None
    return f"the Triton kernels do not support device type {device.type!r}"


def _vector(b: Tensor | None) -> Tensor | None:
    """A bias the kernels can read with unit stride (a strided or expanded one is copied: N elements)."""
    return b if b is None or b.stride(0) == 1 else b.contiguous()


def linear(x: Tensor, w: Tensor, b: Tensor | None, activation: str | None = None) -> Tensor:
    """``act(x @ w.T + b)``, any activation of the registry or none."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return fused_linear(x, w.t(), bias=_vector(b), activation=activation)[0]


def linear_residual_relu_forward(h: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    """``relu(h @ w.T + b + residual)`` in ``promote(h, residual)``'s dtype (the residual read un-rounded)."""
    out_dtype = torch.promote_types(h.dtype, residual.dtype)
    if h.shape[0] == 0:
        return h.new_empty((0, w.shape[0]), dtype=out_dtype)
    return fused_linear(h, w.t(), bias=_vector(b), residual=residual, activation="relu", out_dtype=out_dtype)[0]


def _whole_block_shape(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form) -> bool:
    """The block has the shape the whole-block kernels take: identity shortcut, square w1, ReLU hidden."""
    return ws is None and w1.shape[0] == w1.shape[1] == x.shape[1] and form.activation == "relu"


def whole_block_forward_fits(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form = SEED_FORM) -> bool:
    if not _whole_block_shape(x, w1, ws, form):
        return False
    return bool(whole_block.runnable_forward_configs(whole_block.padded_width(x.shape[1]), w1.element_size(),
                                                     x.element_size(), capability(x.device),
                                                     max_shared_memory(x.device)))


def whole_block_backward_fits(dout: Tensor, w1: Tensor, ws: Tensor | None, form: Form = SEED_FORM) -> bool:
    return (_whole_block_shape(dout, w1, ws, form) and whole_block.takes_dout(dout.element_size(), w1.element_size())
            and whole_block.padded_width(dout.shape[1]) <= whole_block.max_backward_width(capability(dout.device)))


def _output_dtype(x: Tensor, w1: Tensor, ws: Tensor | None, form: Form) -> torch.dtype:
    """The block's output dtype: the weights', or under autocast (``x`` wider) what ``Form.output_dtype`` says."""
    return w1.dtype if x.dtype == w1.dtype else form.output_dtype(x.dtype, w1.dtype, ws is not None)


def block_forward(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, ws: Tensor | None, form: Form,
    *, save: bool, variant: str | None = None, signs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``(out, saved)`` of the block; see ``Backend.block_forward``. ``saved`` may be None when not ``save``.
    Under autocast ``x`` is read once in its own dtype by the kernels (rounded on chip for the GEMMs, added
    un-rounded as the shortcut): no rounded copy."""
    if signs:  # PROTOTYPE: packed by torch after the launch until the kernels' epilogues write the bits
        out, _ = block_forward(x, w1, b1, w2, b2, ws, form, save=False, variant=variant)
        return out, signs_.pack(out)
    b1, b2 = _vector(b1), _vector(b2)
    out_dtype = _output_dtype(x, w1, ws, form)
    final = form.final_activation
    if variant != "two_gemm" and whole_block_forward_fits(x, w1, ws, form):
        return whole_block.forward(x, w1, b1, w2, b2, store_saved=save, final_relu=final == "relu",
                                   out_dtype=out_dtype)
    if x.shape[0] == 0:
        return x.new_empty((0, w2.shape[0]), dtype=out_dtype), x.new_empty((0, w1.shape[0]), dtype=w1.dtype)
    act = form.hidden
    pre = x.new_empty((x.shape[0], w1.shape[0]), dtype=w1.dtype) if save and not act.from_output else None
    h = fused_linear(x, w1.t(), bias=b1, activation=act.name, pre_out=pre, out_dtype=w1.dtype)[0]
    if ws is None:
        out = fused_linear(h, w2.t(), bias=b2, residual=x, activation=final, out_dtype=out_dtype)[0]
    else:
        out = fused_linear(h, w2.t(), second=(x, ws.t()), bias=b2, activation=final, out_dtype=out_dtype)[0]
    return out, (h if act.from_output else pre)


def _split_k(rows: int, cols: int, k: int, device: torch.device) -> int:
    """Slices of K for a weight-gradient GEMM: enough tiles to fill the GPU, each slice >= 1024 rows deep."""
    tiles = max(1, -(-rows // 128) * -(-cols // 128))
    want = max(1, 2 * multiprocessors(device) // tiles)
    return max(1, min(want, k // 1024, 64))


def _weight_grad(g: Tensor, relu_out: Tensor | None, a: Tensor, need_w: bool, need_b: bool, dtype: torch.dtype,
                 a_activation: str | None = None):
    """``(g'^T act(a), column sums of g')``, each only if asked, in ``dtype``, where ``g' = g * (relu_out > 0)`` (the
    mask applied on load) or ``g``, and ``act`` is ``a_activation`` applied on load (or none): one launch, split-K
    reduced inside it."""
    if g.shape[0] == 0:  # an empty batch: zero gradients, no launch
        zeros = g.new_zeros((g.shape[1],), dtype=dtype)
        return (g.new_zeros((g.shape[1], a.shape[1]), dtype=dtype) if need_w else None), (zeros if need_b else None)
    if not need_w or g.shape[1] == 0 or a.shape[1] == 0:
        # No GEMM to run: the bias without its weight (e.g. frozen weights), or a weight with no elements (a
        # zero-size layer): a plain reduction.
        dw = g.new_zeros((g.shape[1], a.shape[1]), dtype=dtype) if need_w else None
        g = g if relu_out is None else _relu_backward(g, relu_out, 0)
        return dw, (g.sum(0, dtype=torch.float32).to(dtype) if need_b else None)
    split = _split_k(g.shape[1], a.shape[1], g.shape[0], g.device)
    mask = None if relu_out is None else relu_out.t()
    return fused_linear(g.t(), a, relu_mask=mask, b_activation=a_activation, rowsum=need_b, split_k=split,
                        out_dtype=dtype)


def linear_residual_relu_backward(
    dout: Tensor, h: Tensor | None, out: Tensor, w: Tensor, needs: tuple[bool, bool, bool, bool], *,
    dh_dtype: torch.dtype,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dh, dw, db, dresidual)``; see ``torch_backend.linear_residual_relu_backward``. The ReLU mask is
    applied on load, unless the residual's gradient (``dout * (out > 0)`` itself) is asked for anyway."""
    if needs[3]:
        g, relu_out = _relu_backward(dout, out, 0), None
    else:
        g, relu_out = dout, out
    dh = fused_linear(g, w, relu_mask=relu_out, out_dtype=dh_dtype)[0] if needs[0] else None
    dw, db = _weight_grad(g, relu_out, h, needs[1], needs[2], w.dtype)
    return dh, dw, db, (g if needs[3] else None)


def block_backward(
    dout: Tensor, x: Tensor | None, saved: Tensor | None, out: Tensor | None, w1: Tensor, w2: Tensor,
    ws: Tensor | None, form: Form, needs: tuple[bool, ...], *, dx_dtype: torch.dtype, variant: str | None = None,
    b1: Tensor | None = None, signs: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dw1, db1, dw2, db2, dws)``; see ``Backend.block_backward``. ``g2 = dout * (out > 0)`` is
    never written: each launch that reads it applies the mask on load."""
    if saved is None:  # PROTOTYPE: a recompute block's hidden layer, one launch (not yet on chip)
        act = form.hidden
        saved = fused_linear(x, w1.t(), bias=_vector(b1), activation=act.name if act.from_output else None,
                             out_dtype=w1.dtype)[0]
    if out is None and signs is not None:  # PROTOTYPE: the mask applied here until the kernels read the bits
        dout = signs_.relu_backward(dout, signs)
        form = Form(form.activation, None)
    need_x, need_w1, need_b1, need_w2, need_b2, need_ws = needs
    need_weights = need_w1 or need_b1 or need_w2 or need_b2
    final_relu = form.final_activation == "relu"
    if (variant != "two_gemm" and (need_x or need_weights)
            and whole_block_backward_fits(dout, w1, ws, form)):
        dx, dw1, db1, dw2, db2 = whole_block.backward(dout, out, saved, x, w1, w2, need_dx=need_x,
                                                      need_weights=need_weights, final_relu=final_relu,
                                                      dx_dtype=dx_dtype)
        return (dx, dw1 if need_w1 else None, db1 if need_b1 else None, dw2 if need_w2 else None,
                db2 if need_b2 else None, None)
    # Under autocast dout and x may be wider than the weights: each launch rounds them on chip for its GEMM.
    act = form.hidden
    relu_out = out if final_relu else None
    dw2, db2 = _weight_grad(dout, relu_out, saved, need_w2, need_b2, w2.dtype,
                            None if act.from_output else act.name)
    dws = _weight_grad(dout, relu_out, x, True, False, ws.dtype)[0] if need_ws else None
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        g1 = fused_linear(dout, w2, relu_mask=relu_out, gate=saved, gate_activation=act.name, out_dtype=w1.dtype)[0]
        dw1, db1 = _weight_grad(g1, None, x, need_w1, need_b1, w1.dtype)
        if need_x:
            if ws is None:
                dx = fused_linear(g1, w1, residual=dout, relu_mask=relu_out, mask_on="residual", out_dtype=dx_dtype)[0]
            else:
                dx = fused_linear(dout, ws, relu_mask=relu_out, second=(g1, w1), out_dtype=dx_dtype)[0]
    return dx, dw1, db1, dw2, db2, dws


def net_forward(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, blocks: list[tuple[Tensor, Tensor | None, Tensor, Tensor | None]],
    w_out: Tensor, b_out: Tensor | None,
) -> Tensor | None:
    """The whole net in one launch where every padded width fits the whole-net kernel, else None (the caller
    then runs it layer by layer). Block parameters are stacked per call: a few small copies, no activations."""
    hidden = w_in.shape[0]
    has_biases = b_in is not None and b_out is not None and all(
        b1 is not None and b2 is not None and w1.shape[0] == hidden for w1, b1, _, b2 in blocks)
    if not (has_biases and whole_net.fits(x.shape[1], w_in.shape[0], w_out.shape[0], x.element_size())):
        return None
    if blocks:
        w1, b1, w2, b2 = (torch.stack(ts) for ts in zip(*blocks, strict=True))
    else:
        w1 = w2 = x.new_empty((0, hidden, hidden))
        b1 = b2 = x.new_empty((0, hidden))
    return whole_net.forward(x, w_in, _vector(b_in), w1, b1, w2, b2, w_out, _vector(b_out))
