"""Rotary position embedding of queries and keys as one Triton launch forward and one backward.

Hugging Face's ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2, Qwen3) computes ``q * cos + rotate_half(q) * sin``
and the same for k: a concatenation, two products and a sum per tensor, each a pass over memory, forward and
backward. Here one program per token rotates every head of q and k from one read of that token's cos/sin row.

Public API::

    apply_rope(q, k, cos, sin, backend="auto") -> (q_rot, k_rot)   # the fused op (autograd.Function inside)
    apply_rope_ref(q, k, cos, sin) -> (q_rot, k_rot)               # plain torch: Hugging Face's formula

Shapes (Hugging Face's layout, ``unsqueeze_dim=1``): ``q`` [b, H, s, d], ``k`` [b, KV, s, d] (any strides: the
attention hands in transposed views of [b, s, heads, d]); ``cos``/``sin`` [bc, s, d] with bc in {1, b}, the
positions each token was given (a sparse layer's gathered rows keep their original ones). Outputs have the inputs'
strides. cos and sin get no gradient (the rotary embedding has no trainable parameter); the fused op refuses ones
that require it. Computed in float32, rounded once to the input dtype (the reference rounds after each op).
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the reference path (dispatch.triton_usable says False)
    triton = None


if triton is not None:

    @triton.jit
    def _rotate(
        src_ptr, dst_ptr, bi, si, c1, s1, c2, s2, HEADS,
        src_sb, src_sh, src_ss, src_sd, dst_sb, dst_sh, dst_ss, dst_sd,
        HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        heads = tl.arange(0, BLOCK_HEADS)[:, None].to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)[None, :].to(tl.int64)
        mask = (heads < HEADS) & (cols < HALF)
        src = src_ptr + bi * src_sb + si * src_ss + heads * src_sh
        x1 = tl.load(src + cols * src_sd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + (cols + HALF) * src_sd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation: d x1 = g1 c1 + g2 s2, d x2 = g2 c2 - g1 s1
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        dst = dst_ptr + bi * dst_sb + si * dst_ss + heads * dst_sh
        tl.store(dst + cols * dst_sd, y1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + (cols + HALF) * dst_sd, y2.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        S, HQ, HK,
        q_sb, q_sh, q_ss, q_sd, k_sb, k_sh, k_ss, k_sd,
        qo_sb, qo_sh, qo_ss, qo_sd, ko_sb, ko_sh, ko_ss, ko_sd,
        c_sb, c_ss, c_sd, s_sb, s_ss, s_sd,
        HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):  # fmt: skip
        # One program per token (axis 0: batch * S + position); cos/sin [bc, s, d] with batch stride 0 when bc == 1.
        pid = tl.program_id(0)
        bi = (pid // S).to(tl.int64)
        si = (pid % S).to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)[None, :].to(tl.int64)
        cmask = cols < HALF
        c_row = cos_ptr + bi * c_sb + si * c_ss
        s_row = sin_ptr + bi * s_sb + si * s_ss
        c1 = tl.load(c_row + cols * c_sd, mask=cmask, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + (cols + HALF) * c_sd, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + cols * s_sd, mask=cmask, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + (cols + HALF) * s_sd, mask=cmask, other=0.0).to(tl.float32)
        _rotate(q_ptr, q_out_ptr, bi, si, c1, s1, c2, s2, HQ, q_sb, q_sh, q_ss, q_sd, qo_sb, qo_sh, qo_ss, qo_sd,
                HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD)  # fmt: skip
        _rotate(k_ptr, k_out_ptr, bi, si, c1, s1, c2, s2, HK, k_sb, k_sh, k_ss, k_sd, ko_sb, ko_sh, ko_ss, ko_sd,
                HALF, BLOCK_HK, BLOCK_HALF, BACKWARD)  # fmt: skip


def _cos_sin_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _rope_launch(q, k, cos, sin, backward: bool):
    b, hq, s, d = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # the inputs' strides (dense tensors keep them)
    if b * s == 0 or d == 0:
        return q_out, k_out
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    warps = min(8, max(1, block_hq * block_half // 512))
    _rope_kernel[(b * s,)](
        q, k, cos, sin, q_out, k_out, s, hq, hk,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *_cos_sin_strides(cos), *_cos_sin_strides(sin),
        HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=warps,
    )  # fmt: skip
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    """Forward: one launch for q and k together, stores cos and sin (the rotary embedding's, shared by every layer).
    Backward: one launch, the transposed rotation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Hugging Face's ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``: the semantic spec of :func:`apply_rope`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(q, k, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [b, heads, s, d], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (s, d) or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if d % 2:
        raise ValueError(f"head dim {d} is odd; rotary embedding rotates two halves")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1:] != (s, d) or t.device != q.device:
            raise ValueError(f"{name} must be [1 or {b}, {s}, {d}] on {q.device}, got {tuple(t.shape)} on {t.device}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto"):
    """Rotate ``q`` and ``k`` by the positions in ``cos``/``sin`` (see the module docstring). ``backend``: "auto",
    "triton" or "torch" (``dispatch.resolve_backend``)."""
    _check(q, k, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rope: cos and sin get no gradient here; compute them without autograd")
    if resolve_backend(backend, q, k, cos, sin) == "torch":
        return apply_rope_ref(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)
