"""lemo_ds.kernels.rope: rotary embedding of q and k in one launch against Hugging Face's apply_rotary_pos_emb
(apply_rope_ref), forward and both gradients; q and k as the attention hands them in (transposed views of
[b, s, heads, d]) and contiguous; cos/sin shared by the batch or per row (a sparse layer's gathered positions)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, poison_empty, rand  # noqa: F401 (fixture)

from lemo_ds.kernels.rope import apply_rope, apply_rope_ref

# (b, query heads, key/value heads, s, d, cos batch)
SHAPES = [(1, 1, 1, 1, 2, 1), (2, 5, 3, 11, 6, 2), (2, 4, 2, 33, 128, 1), (1, 32, 8, 3, 128, 1)]


def heads_view(b, heads, s, d, dtype, gen, transposed):
    if transposed:  # the attention's layout: [b, s, heads, d] memory seen as [b, heads, s, d]
        return rand((b, s, heads, d), dtype, gen).transpose(1, 2)
    return rand((b, heads, s, d), dtype, gen)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("transposed", [True, False], ids=["hf-layout", "contiguous"])
def test_rope_matches_reference(poison_empty, shape, dtype, atol, rtol, transposed):  # noqa: F811
    b, hq, hk, s, d, bc = shape
    gen = torch.Generator().manual_seed(b * 100 + hq * 10 + s)
    q = heads_view(b, hq, s, d, dtype, gen, transposed).requires_grad_()
    k = heads_view(b, hk, s, d, dtype, gen, transposed).requires_grad_()
    angles = rand((bc, s, d // 2), torch.float64, gen, scale=3.0)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)  # Hugging Face's [freqs, freqs] layout
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    dq, dk = rand(q.shape, dtype, gen), rand(k.shape, dtype, gen)

    q_rot, k_rot = apply_rope(q, k, cos, sin, backend="triton")
    plain = apply_rope_ref(q, k, cos, sin)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exact = apply_rope_ref(q64, k64, cos.double(), sin.double())
    assert q_rot.stride() == q.stride() and k_rot.stride() == k.stride()  # the attention's layout is kept
    for name, out, p, e in zip(("q", "k"), (q_rot, k_rot), plain, exact):
        assert_matches(out, p, e, atol, rtol, name)
    grads = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    plain_grads = torch.autograd.grad(plain, (q, k), (dq, dk))
    exact_grads = torch.autograd.grad(exact, (q64, k64), (dq.double(), dk.double()))
    for name, g, p, e in zip(("grad q", "grad k"), grads, plain_grads, exact_grads):
        assert_matches(g, p, e, atol, rtol, name)


def test_rope_errors():
    q, k = torch.randn(1, 2, 3, 4, device=DEVICE), torch.randn(1, 1, 3, 4, device=DEVICE)
    cos = sin = torch.randn(1, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 3 is odd"):
        apply_rope(q[..., :3], k[..., :3], cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(q, k, torch.randn(1, 2, 4, device=DEVICE), sin)
    with pytest.raises(ValueError, match="no gradient"):
        apply_rope(q, k, cos.clone().requires_grad_(), sin)
