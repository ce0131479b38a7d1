"""The package's autograd Functions without the Python layers torch puts around them, where that is provably the
same call (a few microseconds per training step, where the package's own work is a few tens):

- ``c_apply``: ``Function.apply``'s C entry. The Functions run only where no ``torch.func`` transform is active
  (``dispatch.route`` sends those calls to the composite), and there ``Function.apply`` only unwraps functorch's
  dead wrappers before it calls the C entry.
- ``PLAIN_SAVE``: whether ``ctx.save_for_backward(*tensors)`` is ``ctx.to_save = tensors`` on this torch (its
  syntax tree, hashed as below: ``_KNOWN_SAVE``); the Functions then set ``to_save`` themselves, and PyTorch
  saves it after ``forward`` returns exactly as it saves what ``save_for_backward`` set.
- ``direct_backward``: the autograd engine calls a Function's backward node's ``apply``, which torch writes in
  Python (``BackwardCFunction.apply``: pick the user's ``backward`` or ``vjp``, box the gradients if the Function
  asks for it, call it). For a Function that defines ``backward`` only and no ``boxed_grads_call``, that is
  ``backward(node, *grads)``: the node's ``apply`` becomes ``backward`` itself, only where torch's ``apply`` and
  ``_get_user_fn`` are the ones read here (their sources' syntax trees without docstrings, hashed:
  ``_KNOWN_NODE_APPLY``); any other torch keeps its own.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap

import torch

# sha256 (first 16 hex digits) of ``BackwardCFunction.apply`` and ``_get_user_fn``'s syntax trees (``ast.dump``,
# docstrings removed), as torch 2.13 writes them.
_KNOWN_NODE_APPLY = {"043ac580d319fd80"}
# The same of ``FunctionCtx.save_for_backward``.
_KNOWN_SAVE = {"16d2049adc38ba4a"}


def c_apply(function: type[torch.autograd.Function]):
    """``function.apply`` without its Python part (module docstring)."""
    try:
        return super(torch.autograd.Function, function).apply
    except AttributeError:  # another torch's layout of Function: its own apply
        return function.apply


def _tree_hash(*functions) -> str | None:
    """The hash of ``functions``' syntax trees without docstrings, or None where a source cannot be read."""
    dumps = []
    for fn in functions:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return None
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        dumps.append(ast.dump(tree))
    return hashlib.sha256("\n".join(dumps).encode()).hexdigest()[:16]


def node_apply_hash() -> str | None:
    """The hash that ``_KNOWN_NODE_APPLY`` lists for this torch's backward node ``apply`` (None: unreadable)."""
    node = getattr(torch.autograd.function, "BackwardCFunction", None)
    if node is None or not hasattr(node, "apply") or not hasattr(node, "_get_user_fn"):
        return None
    return _tree_hash(node.apply, node._get_user_fn)


def direct_backward(function: type[torch.autograd.Function]) -> bool:
    """Make the engine call ``function.backward`` itself where that is provably what torch's node ``apply`` does
    (module docstring); whether it does."""
    node = getattr(function, "_backward_cls", None)
    base = getattr(torch.autograd.function, "BackwardCFunction", None)
    if (node is None or base is None or not issubclass(node, base) or node.apply is not base.apply
            or getattr(function, "boxed_grads_call", False) or function.vjp is not torch.autograd.Function.vjp
            or function.backward is torch.autograd.Function.backward or node_apply_hash() not in _KNOWN_NODE_APPLY):
        return False
    node.apply = function.backward
    return True


def plain_save() -> bool:
    """Whether this torch's ``save_for_backward`` only sets ``to_save`` (module docstring)."""
    ctx = getattr(torch.autograd.function, "FunctionCtx", None)
    return ctx is not None and _tree_hash(ctx.save_for_backward) in _KNOWN_SAVE


PLAIN_SAVE = plain_save()
