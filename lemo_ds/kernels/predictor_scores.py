"""Inference of a learned block-score predictor (lemo_ds.predictors) in two Triton launches.

The predictor of one layer maps the layer input ``x`` [b, s, h] to block scores [b, n] (n = ceil(s / B))::

    u_t   = relu((W1 x_t) / rms(x_t) + b1)                 [R1] per token: the q units and the k units side by side
    f_J   = [max_{t in J} u_t ; mean_{t in J} u_t]         [2 R1] per block
    q^_J  = W2q f_J,  k^_J = W2k f_J                        [R2] each
    S^(J) = sum over query blocks I with allowed(I, J) of softplus(q^_I . k^_J * scale + dist[I - J])

with ``allowed(I, J) = J <= I and J >= lo_block[I]`` (``lo_block`` None: plain causal) and ``dist`` [n] the
learned bias of each block distance. Launch 1 (grid: blocks x batch) streams the block's B x h slice of x once,
accumulating ``x W1^T`` and the sum of squares together (the RMS scale is applied to the accumulator, so x is never
normalised in memory), then ReLU, pooling and both second layers; it writes q^ and k^ [b, n, 2, R2]. Launch 2
(grid: key-block tiles x batch) walks down the causal column of query-block tiles and sums the softplus tiles,
never materialising the [n, n] matrix. Top-k stays ``torch.topk`` (lemo_ds.core.selection).

Public API::

    pack_predictor(w1q, b1q, w1k, b1k, wq, wk, dtype) -> PackedPredictor     # kernel-ready weights (zero-padded)
    predictor_scores(hidden_states, packed, dist_table, block_size, lo_block=None, backend="auto") -> [b, n] fp32
    predictor_scores_ref(hidden_states, packed, dist_table, block_size, lo_block=None)   # plain torch

Precision: x is read in its dtype and multiplied by W1 (cast to x's dtype) with fp32 accumulation; everything after
the first layer is fp32. The torch path does the same products with torch matmuls, so in fp32 the two agree to
summation order and in bf16 to the rounding of ``x W1^T`` (torch rounds it to bf16; the kernel keeps fp32).
No gradients: this is the scorer's path; training uses the differentiable module in lemo_ds/predictors/module.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs keep the torch path
    triton = None

RMS_EPS = 1e-6
_MAX_BLOCK = 128  # a B x R1 fp32 accumulator per program
_H_TILE = 64  # hidden-size chunk of launch 1 (x tile B x 64 and W1 tile 64 x R1 per step)
_SCORE_TILE = 64  # query and key blocks per tile of launch 2


def _pow2(value: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(value, 1)))))


@dataclass
class PackedPredictor:
    """Zero-padded weights of one predictor in the layout the kernels read.

    w1: [h, R1P] in the input dtype (q units in columns 0..r1q-1, k units after them, zero columns to R1P);
    b1: [R1P] fp32; w2: [2 (q, k), R2P, 2 * R1P] fp32 (the max-pooled features in columns 0..R1P-1, the mean-pooled
    after them; each side's matrix is zero on the other side's units); r2: the true width of q^ and k^.
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    r2: int

    @property
    def r1_padded(self) -> int:
        return self.w1.shape[1]

    @property
    def r2_padded(self) -> int:
        return self.w2.shape[1]


def pack_predictor(
    w1q: torch.Tensor,  # [r1q, h]
    b1q: torch.Tensor,  # [r1q]
    w1k: torch.Tensor,  # [r1k, h]
    b1k: torch.Tensor,  # [r1k]
    wq: torch.Tensor,  # [r2, 2 r1q]: columns 0..r1q-1 read the max-pooled units, r1q.. the mean-pooled ones
    wk: torch.Tensor,  # [r2, 2 r1k]
    dtype: torch.dtype,
) -> PackedPredictor:
    with torch.no_grad():
        r1q, h = w1q.shape
        r1k = w1k.shape[0]
        r2 = wq.shape[0]
        r1p, r2p = _pow2(r1q + r1k), _pow2(r2)
        device = w1q.device
        w1 = torch.zeros(h, r1p, dtype=dtype, device=device)
        w1[:, :r1q] = w1q.t().to(dtype)
        w1[:, r1q : r1q + r1k] = w1k.t().to(dtype)
        b1 = torch.zeros(r1p, dtype=torch.float32, device=device)
        b1[:r1q], b1[r1q : r1q + r1k] = b1q.float(), b1k.float()
        w2 = torch.zeros(2, r2p, 2 * r1p, dtype=torch.float32, device=device)
        w2[0, :r2, :r1q], w2[0, :r2, r1p : r1p + r1q] = wq[:, :r1q].float(), wq[:, r1q:].float()
        w2[1, :r2, r1q : r1q + r1k] = wk[:, :r1k].float()
        w2[1, :r2, r1p + r1q : r1p + r1q + r1k] = wk[:, r1k:].float()
    return PackedPredictor(w1.contiguous(), b1, w2.contiguous(), r2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _block_embed_kernel(
        x_ptr,  # [b, s, h]
        w1_ptr,  # [h, R1P] contiguous, x's dtype
        b1_ptr,  # [R1P] fp32
        w2_ptr,  # [2, R2P, 2 R1P] fp32 contiguous
        out_ptr,  # [b, n, 2, R2P] fp32 contiguous
        S,
        N_BLOCKS,
        x_sb,
        x_ss,
        x_sh,
        HIDDEN: tl.constexpr,
        H_TILES: tl.constexpr,  # cdiv(HIDDEN, H_TILE)
        BLOCK: tl.constexpr,  # B
        BLOCK_T: tl.constexpr,  # B rounded up to a power of two >= 16
        H_TILE: tl.constexpr,
        R1P: tl.constexpr,
        R2P: tl.constexpr,
        UPCAST: tl.constexpr,  # the CPU interpreter multiplies bf16 as raw bits: load as fp32 there
        INPUT_PRECISION: tl.constexpr,
    ):
        # One program per (block J, sample): x's B x h slice is read once, in H_TILE chunks; the RMS scale and the
        # product with W1 accumulate together (W1 (x / rms) = (W1 x) / rms), so no normalised copy of x exists.
        # The loop bound is constexpr: Triton's CPU interpreter cannot iterate over runtime bounds.
        j = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        x_ss64, x_sh64 = tl.cast(x_ss, tl.int64), tl.cast(x_sh, tl.int64)
        t = tl.arange(0, BLOCK_T)
        rows = j * BLOCK + t  # [BT] token positions
        row_ok = (t < BLOCK) & (rows < S)
        units = tl.arange(0, R1P)
        acc = tl.zeros([BLOCK_T, R1P], dtype=tl.float32)
        sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for hc in range(0, H_TILES):
            cols = hc * H_TILE + tl.arange(0, H_TILE)
            col_ok = cols < HIDDEN
            x = tl.load(
                x_ptr + bi * x_sb + rows[:, None] * x_ss64 + cols[None, :] * x_sh64,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [BT, H_TILE]
            w = tl.load(w1_ptr + cols[:, None] * R1P + units[None, :], mask=col_ok[:, None], other=0.0)  # [HT, R1P]
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
            acc += tl.dot(x, w, input_precision=INPUT_PRECISION)
        rinv = 1.0 / tl.sqrt(sumsq / HIDDEN + 1e-6)  # RMS_EPS
        bias = tl.load(b1_ptr + units)  # [R1P]
        u = tl.maximum(acc * rinv[:, None] + bias[None, :], 0.0)
        u = tl.where(row_ok[:, None], u, 0.0)  # [BT, R1P]
        count = tl.minimum(S - j * BLOCK, BLOCK).to(tl.float32)
        u_max = tl.max(u, axis=0)  # [R1P]
        u_mean = tl.sum(u, axis=0) / count  # [R1P]
        r = tl.arange(0, R2P)
        for side in tl.static_range(2):  # 0: q^, 1: k^
            base = w2_ptr + side * R2P * 2 * R1P + r[:, None] * (2 * R1P) + units[None, :]
            w_max = tl.load(base)  # [R2P, R1P]
            w_mean = tl.load(base + R1P)  # [R2P, R1P]
            emb = tl.sum(w_max * u_max[None, :], axis=1) + tl.sum(w_mean * u_mean[None, :], axis=1)  # [R2P]
            tl.store(out_ptr + ((bi * N_BLOCKS + j) * 2 + side) * R2P + r, emb)

    @triton.jit
    def _block_scores_kernel(
        emb_ptr,  # [b, n, 2, R2P] fp32 contiguous (q^ at side 0, k^ at side 1)
        dist_ptr,  # [n] fp32: bias of each block distance
        lo_ptr,  # [b, n] int32 (batch stride 0 when shared); unused unless HAS_LO
        out_ptr,  # [b, n] fp32
        N_BLOCKS,
        scale,
        lo_sb,
        R2P: tl.constexpr,
        TILE: tl.constexpr,
        N_TILES: tl.constexpr,  # cdiv(n, TILE): constexpr for the interpreter's loop
        HAS_LO: tl.constexpr,
    ):
        # One program per (tile of key blocks, sample): walks down the column over the query-block tiles at or below
        # the diagonal, adding the softplus tiles in registers in a fixed order (deterministic, no atomics).
        jt = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        r = tl.arange(0, R2P)
        cols = jt * TILE + tl.arange(0, TILE)  # [TILE] key blocks J
        col_ok = cols < N_BLOCKS
        k_ptrs = emb_ptr + ((bi * N_BLOCKS + cols[:, None]) * 2 + 1) * R2P + r[None, :]
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)  # [TILE, R2P]
        kt = tl.trans(k)  # [R2P, TILE]
        col_sum = tl.zeros([TILE], dtype=tl.float32)
        for it in range(0, N_TILES):
            if it >= jt:  # query tiles above the diagonal hold no allowed pair
                rows = it * TILE + tl.arange(0, TILE)  # [TILE] query blocks I
                row_ok = rows < N_BLOCKS
                q = tl.load(emb_ptr + ((bi * N_BLOCKS + rows[:, None]) * 2) * R2P + r[None, :], mask=row_ok[:, None],
                            other=0.0)  # fmt: skip
                logits = tl.dot(q, kt, input_precision="ieee") * scale  # [TILE, TILE]
                dist = rows[:, None] - cols[None, :]
                allowed = (dist >= 0) & row_ok[:, None] & col_ok[None, :]
                if HAS_LO:
                    lo = tl.load(lo_ptr + bi * lo_sb + rows, mask=row_ok, other=0)
                    allowed = allowed & (cols[None, :] >= lo[:, None])
                bias = tl.load(dist_ptr + dist, mask=allowed, other=0.0)
                z = logits + bias
                softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
                col_sum += tl.sum(tl.where(allowed, softplus, 0.0), axis=0)
        tl.store(out_ptr + bi * N_BLOCKS + cols, col_sum, mask=col_ok)


def _launch(hidden_states, packed: PackedPredictor, dist_table, block_size, lo_block) -> torch.Tensor:
    b, s, h = hidden_states.shape
    n = math.ceil(s / block_size)
    device = hidden_states.device
    upcast = device.type == "cpu" and hidden_states.dtype == torch.bfloat16
    emb = torch.empty(b, n, 2, packed.r2_padded, dtype=torch.float32, device=device)  # [b, n, 2, R2P]
    _block_embed_kernel[(n, b)](
        hidden_states,
        packed.w1,
        packed.b1,
        packed.w2,
        emb,
        s,
        n,
        *hidden_states.stride(),
        HIDDEN=h,
        H_TILES=triton.cdiv(h, _H_TILE),
        BLOCK=block_size,
        BLOCK_T=_pow2(block_size),
        H_TILE=_H_TILE,
        R1P=packed.r1_padded,
        R2P=packed.r2_padded,
        UPCAST=upcast,
        # fp32 inputs: exact fp32 products (tf32 would round x to 10 mantissa bits); ignored for 16-bit inputs.
        INPUT_PRECISION="ieee" if hidden_states.dtype == torch.float32 or upcast else "tf32",
        num_warps=4,
    )
    scores = torch.empty(b, n, dtype=torch.float32, device=device)  # [b, n]
    lo = lo_block.to(torch.int32).contiguous() if lo_block is not None else scores  # placeholder when absent
    _block_scores_kernel[(triton.cdiv(n, _SCORE_TILE), b)](
        emb,
        dist_table.float().contiguous(),
        lo,
        scores,
        n,
        packed.r2**-0.5,
        0 if lo_block is None or lo.shape[0] == 1 else lo.stride(0),
        R2P=packed.r2_padded,
        TILE=_SCORE_TILE,
        N_TILES=triton.cdiv(n, _SCORE_TILE),
        HAS_LO=lo_block is not None,
        num_warps=4,
    )
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Torch path and public API
# ----------------------------------------------------------------------------------------------------------------


def _check(hidden_states, packed: PackedPredictor, dist_table, block_size, lo_block) -> None:
    if hidden_states.dim() != 3 or not hidden_states.is_floating_point():
        raise ValueError(f"hidden_states must be a float [b, s, h] tensor, got {tuple(hidden_states.shape)}")
    b, s, h = hidden_states.shape
    if packed.w1.shape[0] != h:
        raise ValueError(f"the predictor takes hidden size {packed.w1.shape[0]}, hidden_states has {h}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    n = math.ceil(s / block_size)
    if dist_table.shape != (n,):
        raise ValueError(f"dist_table must be [{n}] (one bias per block distance), got {tuple(dist_table.shape)}")
    if lo_block is not None and (lo_block.dim() != 2 or lo_block.shape[1] != n or lo_block.shape[0] not in (1, b)):
        raise ValueError(f"lo_block must be [b or 1, {n}], got {tuple(lo_block.shape)}")


def kernel_supports(hidden_states: torch.Tensor, block_size: int) -> str | None:
    """None when the Triton kernels take this input, else why not."""
    if block_size > _MAX_BLOCK:
        return f"block size {block_size} is above {_MAX_BLOCK}"
    if hidden_states.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {hidden_states.dtype} is not float32, bfloat16 or float16"
    return None


def predictor_scores_ref(
    hidden_states: torch.Tensor,  # [b, s, h]
    packed: PackedPredictor,
    dist_table: torch.Tensor,  # [n]
    block_size: int,
    lo_block: torch.Tensor | None = None,  # [b or 1, n] int
) -> torch.Tensor:
    """Plain-torch spec of the kernels: [b, n] fp32. Memory O(s x R1 + n^2), x is not copied in fp32."""
    _check(hidden_states, packed, dist_table, block_size, lo_block)
    with torch.no_grad():
        b, s, h = hidden_states.shape
        n = math.ceil(s / block_size)
        sumsq = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=torch.float32).square()  # [b, s]
        rinv = torch.rsqrt(sumsq / h + RMS_EPS)
        pre = (hidden_states @ packed.w1.to(hidden_states.dtype)).float() * rinv[..., None] + packed.b1  # [b, s, R1P]
        u = F.pad(pre.clamp_min_(0.0), (0, 0, 0, n * block_size - s)).view(b, n, block_size, -1)  # [b, n, B, R1P]
        counts = torch.full((n, 1), float(block_size), device=u.device)
        counts[-1] = s - (n - 1) * block_size
        features = torch.cat([u.amax(2), u.sum(2) / counts], dim=-1)  # [b, n, 2 R1P]
        q_hat = features @ packed.w2[0].t()  # [b, n, R2P]
        k_hat = features @ packed.w2[1].t()
        idx = torch.arange(n, device=u.device)
        dist = (idx[:, None] - idx[None, :]).clamp_min(0)  # [n, n]
        logits = q_hat @ k_hat.transpose(1, 2) * packed.r2**-0.5 + dist_table.float()[dist]  # [b, n, n]
        allowed = idx[None, :] <= idx[:, None]
        if lo_block is not None:
            allowed = allowed & (idx[None, None, :] >= lo_block[:, :, None])  # [b, n, n]
        return (F.softplus(logits) * allowed).sum(1)


def predictor_scores(
    hidden_states: torch.Tensor,  # [b, s, h], the layer input
    packed: PackedPredictor,
    dist_table: torch.Tensor,  # [n] fp32
    block_size: int,
    lo_block: torch.Tensor | None = None,  # [b or 1, n] int: first key block each query block reaches
    backend: str = "auto",
) -> torch.Tensor:
    """Predicted block scores [b, n] float32 (see the module docstring), without gradients.

    backend: "auto" (Triton where usable, else torch), "triton" (raises when it cannot run) or "torch".
    """
    _check(hidden_states, packed, dist_table, block_size, lo_block)
    use = resolve_backend(backend, hidden_states, packed.w1, lo_block)
    if use == "triton":
        reason = kernel_supports(hidden_states, block_size)
        if reason is not None:
            if backend == "triton":
                raise ValueError(f"predictor_scores: backend='triton' cannot run: {reason}; use 'auto' or 'torch'")
            use = "torch"
    if use == "torch":
        return predictor_scores_ref(hidden_states, packed, dist_table, block_size, lo_block)
    with torch.no_grad():
        return _launch(hidden_states, packed, dist_table, block_size, lo_block)
