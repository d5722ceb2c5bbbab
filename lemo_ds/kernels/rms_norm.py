"""RMSNorm as one Triton pass forward and one backward, with the Llama family's rounding.

Hugging Face's ``LlamaRMSNorm`` (also Mistral's, Qwen2's, Qwen3's) runs six kernels and stores float32 copies of its
input for backward (the float32 input, the normalised float32 rows, the rounded rows: about 10 x h bytes per token).
Here autograd stores the input as it is and one float32 per row (the reciprocal RMS), and each direction is one pass
over the rows.

Public API::

    rms_norm(x, weight, eps, backend="auto") -> y          # the fused op (autograd.Function inside)
    rms_norm_ref(x, weight, eps) -> y                      # plain torch: Hugging Face's formula, the semantic spec

Semantics, as the Llama modeling code: ``n = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)``, then
``y = weight * n`` in the promoted dtype of the two. Shapes: ``x`` [..., h], ``weight`` [h]. The fused op computes in
float32 and rounds where the reference rounds (``n`` to x's dtype, ``y`` to the output dtype); its gradients are the
exact gradients of that function computed in float32, so they differ from autograd's bf16 chain by rounding only.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the reference path (dispatch.triton_usable says False)
    triton = None

# Rows one backward program handles when it also sums the weight's gradient (a static loop: a partial sum per
# program, [programs, h] float32, then one torch sum). 32 rows keep that buffer at 1/32 of the input's rows.
_DW_ROWS = 32


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr,  # [n, h], rows contiguous
        w_ptr,  # [h]
        y_ptr,  # [n, h], contiguous
        rstd_ptr,  # [n] float32
        H,
        eps,
        BLOCK_H: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # Hugging Face rounds here (.to(input_dtype))
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr,  # [n, h], contiguous
        x_ptr,  # [n, h], contiguous
        w_ptr,  # [h]
        rstd_ptr,  # [n] float32
        dx_ptr,  # [n, h], contiguous
        dw_ptr,  # [programs, h] float32 partial sums (unused unless HAS_DW)
        N,
        H,
        ROWS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_DW: tl.constexpr,
    ):
        # dx = rstd * (g - x * rstd^2 * mean(g * x)) with g = dy * w, all in float32; dw = sum over rows of dy * n.
        # ROWS rows per program in a static loop (the CPU interpreter runs no loop with runtime bounds); rows past N
        # are masked off.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        cmask = cols < H
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in tl.static_range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            live = (row + tl.zeros([BLOCK_H], dtype=tl.int64)) < N
            mask = cmask & live
            x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + tl.minimum(row, N - 1))  # a row past N reads row N - 1, masked off below
            g = dy * w
            dot = tl.sum(g * x, axis=0) / H
            dx = rstd * (g - x * rstd * rstd * dot)
            tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_DW:
                normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                dw += dy * normed
        if HAS_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=cmask)


def _block(h: int) -> tuple[int, int]:
    block = triton.next_power_of_2(h)
    return block, min(16, max(1, block // 256))


def _rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    n, h = x2.shape  # x2 [n, h] contiguous
    y = torch.empty((n, h), dtype=out_dtype, device=x2.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    if n:
        block, warps = _block(h)
        _rms_norm_fwd_kernel[(n,)](x2, weight, y, rstd, h, eps, BLOCK_H=block, num_warps=warps)
    return y, rstd


def _rms_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool):
    n, h = x2.shape
    dx = torch.empty_like(x2)
    rows = _DW_ROWS if need_dw else 1
    programs = triton.cdiv(n, rows) if n else 0
    dw_partial = torch.empty((programs, h), dtype=torch.float32, device=x2.device) if need_dw else dx
    if n:
        block, warps = _block(h)
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, n, h, ROWS=rows, BLOCK_H=block,
                                          HAS_DW=need_dw, num_warps=warps)  # fmt: skip
    dw = None
    if need_dw:
        dw = (dw_partial.sum(0) if n else torch.zeros(h, dtype=torch.float32, device=x2.device)).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Forward: one launch, stores x and rstd [n] float32. Backward: one launch (plus a torch sum of the weight's
    partial gradients when the weight trains)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [n, h]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y, rstd = _rms_norm_forward(x2, weight, eps, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw = _rms_norm_backward(dy2, x2, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Llama RMSNorm, op for op: the semantic spec of :func:`rms_norm`."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a [..., h] tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [h] = [{x.shape[-1]}] for x {tuple(x.shape)}, got {got}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [..., h] scaled by ``weight`` [h] (see the module docstring).

    ``backend``: "auto" (Triton where usable, else :func:`rms_norm_ref`), "triton" or "torch"
    (``dispatch.resolve_backend``)."""
    _check(x, weight)
    if resolve_backend(backend, x, weight) == "torch":
        return rms_norm_ref(x, weight, eps)
    return RMSNormFunction.apply(x, weight, float(eps))
