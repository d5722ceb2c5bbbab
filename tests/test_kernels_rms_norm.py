"""lemo_ds.kernels.rms_norm: the Triton kernels against Hugging Face's formula (rms_norm_ref), forward and both
gradients, on odd shapes, with a frozen and a trainable weight."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, poison_empty, rand  # noqa: F401 (fixture)

from lemo_ds.kernels.rms_norm import _DW_ROWS, rms_norm, rms_norm_ref

# [..., h]: one element; odd rows and width; more rows than one weight-gradient program (tail rows masked); a wide row.
SHAPES = [(1, 1), (3, 37, 100), (2 * _DW_ROWS + 5, 48), (2, 3, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("train_weight", [True, False], ids=["weight-trains", "weight-frozen"])
def test_rms_norm_matches_reference(poison_empty, shape, dtype, atol, rtol, train_weight):  # noqa: F811
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    x = rand(shape, dtype, gen).requires_grad_()
    weight = (1 + 0.3 * rand(shape[-1:], torch.float64, gen)).to(dtype).requires_grad_(train_weight)
    dy = rand(shape, dtype, gen)
    eps = 1e-5

    y = rms_norm(x, weight, eps, backend="triton")
    plain = rms_norm_ref(x, weight, eps)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_(train_weight)
    exact = rms_norm_ref(x64, w64, eps)
    assert y.shape == x.shape and y.dtype == dtype
    assert_matches(y, plain, exact, atol, rtol, "output")

    inputs = (x, weight) if train_weight else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    plain_grads = torch.autograd.grad(plain, inputs, dy)
    exact_grads = torch.autograd.grad(exact, (x64, w64) if train_weight else (x64,), dy.double())
    for name, g, p, e in zip(("grad x", "grad weight"), grads, plain_grads, exact_grads):
        # The weight's gradient sums over every row: its error grows with the row count.
        scale = 1.0 if name == "grad x" else max(1.0, (x.numel() // shape[-1]) ** 0.5)
        assert_matches(g, p, e, atol * scale, rtol, name)


def test_rms_norm_backends_and_errors():
    x = torch.randn(2, 3, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    assert torch.equal(rms_norm(x, weight, 1e-6, backend="torch"), rms_norm_ref(x, weight, 1e-6))
    with pytest.raises(ValueError, match=r"weight must be \[h\] = \[8\]"):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        rms_norm(x, weight, 1e-6, backend="cuda")
