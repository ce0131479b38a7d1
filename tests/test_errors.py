"""Bad input gets the exception types nn.Linear raises, with messages that name what was involved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fused_residual as fr
from fused_residual import functional


def both(in_features=6, out_features=6):
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features), fr.FusedResidualBlock(in_features, out_features)


def raised_by(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.type


@pytest.mark.parametrize(
    "bad_input,pattern",
    [
        (torch.randn(4, 5), r"\(4, 5\).*last dimension 5.*\(6, 6\).*in_features=6"),
        (torch.randn(4, 6, dtype=torch.float64), r"torch\.float64 and torch\.float32"),
        (torch.randint(0, 3, (4, 6)), r"floating-point x, got torch\.int64"),
        (torch.tensor(1.0), r"at least 1 dimension"),
    ],
    ids=["wrong_last_dim", "dtype_mismatch", "integer_input", "zero_dim"],
)
def test_bad_tensor_input_raises_runtime_error_like_nn_linear(bad_input, pattern):
    linear, block = both()
    assert raised_by(linear, bad_input) is RuntimeError
    with pytest.raises(RuntimeError, match=pattern):
        block(bad_input)


@pytest.mark.parametrize("bad_input", [[[1.0] * 6], None, 3.0], ids=["list", "none", "float"])
def test_non_tensor_input_raises_type_error_like_nn_linear(bad_input):
    linear, block = both()
    assert raised_by(linear, bad_input) is TypeError
    with pytest.raises(TypeError, match="must be a Tensor"):
        block(bad_input)


def test_device_mismatch_raises_runtime_error_naming_devices():
    _, block = both()
    block.to("meta")
    with pytest.raises(RuntimeError, match=r"x on cpu and w1 on meta"):
        block(torch.randn(3, 6))


def test_functional_checks_every_operand():
    x = torch.randn(3, 4)
    w1, b1, w2, b2 = torch.randn(4, 4), torch.randn(4), torch.randn(4, 4), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"w2 of shape \(4, 5\)"):
        functional.residual_block(x, w1, b1, torch.randn(4, 5), b2)
    with pytest.raises(RuntimeError, match=r"bias of shape \(3,\)"):
        functional.residual_block(x, w1, b1, w2, torch.randn(3))
    with pytest.raises(RuntimeError, match="identity shortcut.*shortcut_weight"):
        functional.residual_block(torch.randn(3, 2), torch.randn(4, 2), None, w2, None)
    with pytest.raises(RuntimeError, match=r"residual of shape \(3, 5\)"):
        functional.linear_residual_relu(x, w1, b1, torch.randn(3, 5))
    with pytest.raises(TypeError, match="'w2' must be a Tensor"):
        functional.residual_block(x, w1, b1, "w2", b2)
    with pytest.raises(RuntimeError, match=r"torch\.float32 and torch\.float16"):
        functional.residual_block(x, w1, b1.half(), w2, b2)


def test_biases_may_be_none():
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), torch.randn(
        4, 4, dtype=torch.float64)
    expected = torch.relu(torch.relu(x @ w1.t()) @ w2.t() + x)
    torch.testing.assert_close(functional.residual_block(x, w1, None, w2, None), expected)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_input_is_refused_with_a_clear_error(layout):
    _, block = both()
    x = torch.randn(4, 6)
    x = x.to_sparse() if layout == "sparse_coo" else x.to_sparse_csr()
    with pytest.raises(RuntimeError, match=r"x must be a dense \(strided\) tensor.*x\.to_dense\(\)"):
        block(x)
    with pytest.raises(RuntimeError, match=r"w1 must be a dense \(strided\) tensor"):
        functional.residual_block(torch.randn(4, 6), block.linear1.weight.detach().to_sparse(), None,
                                  block.linear2.weight, None)


def test_single_layer_errors_name_its_first_argument_h():
    w, b, r = torch.randn(4, 4), torch.randn(4), torch.randn(3, 4)
    with pytest.raises(TypeError, match="argument 'h' must be a Tensor"):
        functional.linear_residual_relu([1.0], w, b, r)
    with pytest.raises(RuntimeError, match=r"h of shape \(3, 5\) has last dimension 5"):
        functional.linear_residual_relu(torch.randn(3, 5), w, b, r)
    with pytest.raises(RuntimeError, match=r"expected h and w to have the same dtype"):
        functional.linear_residual_relu(torch.randn(3, 4, dtype=torch.float64), w, b, r)


def test_main_command_prints_no_numpy_warning():
    """`python -m fused_residual` on a fresh install: numpy is a dependency, so torch finds it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c",
                           "import importlib.metadata as m, fused_residual, torch; "
                           "print('numpy' in ' '.join(m.requires('fused_residual') or [])); torch.zeros(1).numpy()"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
