"""lemo_ds.kernels.swiglu: silu(gate) * up in one pass against the Llama MLP's torch ops (silu_mul_ref), forward and
both gradients, on odd sizes (several programs, a masked tail)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, poison_empty, rand  # noqa: F401 (fixture)

from lemo_ds.kernels.swiglu import silu_mul, silu_mul_ref

SHAPES = [(1,), (2, 9, 77), (3, 1000), (1, 2, 2053)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_mul_matches_reference(poison_empty, shape, dtype, atol, rtol):  # noqa: F811
    gen = torch.Generator().manual_seed(sum(shape))
    gate = rand(shape, dtype, gen, scale=3.0).requires_grad_()  # past SiLU's knee on both sides
    up = rand(shape, dtype, gen).requires_grad_()
    dout = rand(shape, dtype, gen)

    out = silu_mul(gate, up, backend="triton")
    plain = silu_mul_ref(gate, up)
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    exact = silu_mul_ref(gate64, up64)
    assert out.shape == gate.shape and out.dtype == dtype
    assert_matches(out, plain, exact, atol, rtol, "output")
    grads = torch.autograd.grad(out, (gate, up), dout)
    plain_grads = torch.autograd.grad(plain, (gate, up), dout)
    exact_grads = torch.autograd.grad(exact, (gate64, up64), dout.double())
    for name, g, p, e in zip(("grad gate", "grad up"), grads, plain_grads, exact_grads):
        assert_matches(g, p, e, atol, rtol, name)


def test_silu_mul_errors():
    gate = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="gate and up must match"):
        silu_mul(gate, torch.randn(4, 5, device=DEVICE))
    assert torch.equal(silu_mul(gate, gate, backend="torch"), silu_mul_ref(gate, gate))
