"""The SwiGLU product ``silu(gate) * up`` as one Triton pass forward and one backward.

Hugging Face's Llama-family MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: two kernels, and autograd
stores gate, SiLU's output and up (3 x I values per token). Here it stores gate and up only and recomputes the
sigmoid in backward (the product's own output is what ``down_proj`` stores, as before).

Public API::

    silu_mul(gate, up, backend="auto") -> out       # the fused op (autograd.Function inside)
    silu_mul_ref(gate, up) -> out                   # plain torch: Hugging Face's ops, the semantic spec

Shapes: ``gate`` and ``up`` [..., I], same shape, dtype and device; ``out`` likewise. The fused op computes in
float32 and rounds where the reference rounds (SiLU's output, then the product, to the input dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the reference path (dispatch.triton_usable says False)
    triton = None

_BLOCK = 1024  # elements per program: an elementwise op, four 16-byte accesses per thread with 4 warps (bf16)


if triton is not None:

    @triton.jit
    def _silu_mul_fwd_kernel(gate_ptr, up_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        a = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(out_ptr.dtype.element_ty).to(tl.float32)  # SiLU's output is rounded first
        tl.store(out_ptr + offsets, (silu * b).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, N, BLOCK: tl.constexpr):
        # d gate = dout * up * sigmoid(a) * (1 + a * (1 - sigmoid(a))); d up = dout * silu(a)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        g = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(dup_ptr + offsets, (g * silu).to(dup_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptr + offsets, (g * b * sig * (1.0 + a * (1.0 - sig))).to(dgate_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


class SiluMulFunction(torch.autograd.Function):
    """Forward: one launch, stores gate and up. Backward: one launch."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _silu_mul_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _silu_mul_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
        return dgate, dup


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, as the Llama MLP computes it: the semantic spec of :func:`silu_mul`."""
    return F.silu(gate) * up


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match: gate {tuple(gate.shape)} {gate.dtype} on {gate.device}, "
            f"up {tuple(up.shape)} {up.dtype} on {up.device}"
        )


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (see the module docstring). ``backend``: "auto", "triton" or "torch"
    (``dispatch.resolve_backend``)."""
    _check(gate, up)
    if resolve_backend(backend, gate, up) == "torch":
        return silu_mul_ref(gate, up)
    return SiluMulFunction.apply(gate, up)
