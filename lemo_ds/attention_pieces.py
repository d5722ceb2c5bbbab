"""Flash attention over documents in calls whose buffers stay under 2**31 elements.

torch's flash attention backward (2.11, one call over packed documents) returns wrong query gradients and NaN value
gradients once the call's queries pass 2**31 elements, while one call of exactly 2**31 is right
(benchmarks/flash_limit.py; tests/test_large_tensors.py at 800K tokens of 32 x 128 heads). The likely cause is an
offset computed in 32 bits: flash-attention fixed a wrap of that kind in its dQ accumulator upstream
(Dao-AILab/flash-attention#1500). lemo_ds therefore splits a call past that size (``FLASH_ELEMENT_LIMIT``, counting
the accumulator's 128 spare rows per document as well, which is on the safe side of what was measured) into pieces
of ``PIECE_ELEMENT_LIMIT``:

- whole documents are grouped into one piece while the piece's accumulator fits (at 32 x 128 heads, a piece
  per 64K tokens or less);
- a document too long for one piece is split by queries: queries [a, b) of a document that starts at ``start``
  attend keys [start, b), causal aligned at the bottom right (the last query sees every key), which is flash's
  alignment when a call has fewer queries than keys.

``PiecewiseAttention`` runs the pieces forward and backward with one kernel: ``FLASH`` (torch's flash kernels,
CUDA) or ``REFERENCE`` (plain torch, which the CPU tests use to check the pieces' composition). Gradients go into
full-size tensors allocated once; only one piece's gradients exist besides them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

FLASH_ELEMENT_LIMIT = 2**31 - 1
"""The largest element count one flash call's query-side buffers may reach: the largest 32-bit offset."""

PIECE_ELEMENT_LIMIT = 2**28
"""The pieces' size once a call is split. A piece's backward holds its float32 accumulator and its own gradients
beside the full-size ones, so small pieces cost less device memory than large ones: the main job at 512K + 64 tokens
on an H100 ran out of memory in a piece's backward with pieces up to ``FLASH_ELEMENT_LIMIT``, and fit with these
(benchmarks/results/max-context-20261207)."""

_PADDING_ROWS = 128  # flash's varlen dQ accumulator: 128 spare rows after each document


@dataclass(frozen=True)
class Piece:
    """One call: queries [q_start, q_stop) of the flattened tokens over keys [k_start, q_stop), documents given
    by cumulative lengths relative to those starts (the two differ only for a document split by queries)."""

    q_start: int
    q_stop: int
    k_start: int
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in zip(self.cu_q[:-1], self.cu_q[1:], strict=True))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in zip(self.cu_k[:-1], self.cu_k[1:], strict=True))


def accumulator_rows(heads: int, head_dim: int, limit: int = FLASH_ELEMENT_LIMIT) -> int:
    """The most accumulator rows (tokens plus 128 per document) one call may have: heads x head dim (rounded up
    to 64, at least flash's rounding) elements each."""
    return limit // (heads * math.ceil(head_dim / 64) * 64)


def first_tokens_in_pieces(documents: int, heads: int, head_dim: int, limit: int = FLASH_ELEMENT_LIMIT) -> int:
    """The fewest tokens in ``documents`` documents for which one call would pass ``limit``."""
    return accumulator_rows(heads, head_dim, limit) - _PADDING_ROWS * documents + 1


def needs_pieces(tokens: int, documents: int, heads: int, head_dim: int, limit: int = FLASH_ELEMENT_LIMIT) -> bool:
    """One call over ``tokens`` in ``documents`` would pass ``limit`` (no host sync: sizes only)."""
    return tokens >= first_tokens_in_pieces(documents, heads, head_dim, limit)


def plan_pieces(cu_seqlens: list[int], heads: int, head_dim: int, limit: int = FLASH_ELEMENT_LIMIT) -> list[Piece]:
    """The calls that cover the documents of ``cu_seqlens`` (cumulative lengths over the flattened tokens), each
    within ``limit``: whole documents grouped in order, a document longer than one call split by queries."""
    rows = accumulator_rows(heads, head_dim, limit)
    longest_piece = (rows - _PADDING_ROWS) // _PADDING_ROWS * _PADDING_ROWS  # queries of a split document's piece
    if longest_piece < 1:
        raise ValueError(f"flash attention with {heads} heads of {head_dim} cannot fit one row under {limit}")
    pieces: list[Piece] = []
    group: list[int] = [cu_seqlens[0]]  # document bounds of the piece being filled

    def close_group() -> None:
        if len(group) > 1:
            cu = tuple(b - group[0] for b in group)
            pieces.append(Piece(group[0], group[-1], group[0], cu, cu))
        group[:] = [group[-1]]

    for start, stop in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        length = stop - start
        if length + _PADDING_ROWS > rows:  # too long for one call: split by queries
            close_group()
            for a in range(start, stop, longest_piece):
                b = min(a + longest_piece, stop)
                pieces.append(Piece(a, b, start, (0, b - a), (0, b - start)))
            group[:] = [stop]
            continue
        if (group[-1] - group[0]) + length + _PADDING_ROWS * len(group) > rows:
            close_group()
        group.append(stop)
    close_group()
    return pieces


class PieceKernel(Protocol):
    def forward(self, q, k, v, piece: Piece, scale: float) -> tuple[torch.Tensor, Any]:
        """(out [tq, H, d], what backward needs besides the inputs and out) of one piece: q [tq, H, d], k and v
        [tk, KV, d]."""

    def backward(self, dout, q, k, v, out, saved: Any, piece: Piece, scale: float):
        """(dq, dk, dv) of one piece; ``saved``: what its forward returned beside out."""


class _Flash:
    """torch's flash kernels (the ones ``torch.nn.attention.varlen.varlen_attn`` calls), causal, no dropout."""

    def forward(self, q, k, v, piece: Piece, scale: float):
        cu_q, cu_k = _cu(piece.cu_q, q.device), _cu(piece.cu_k, q.device)
        out, lse, rng_state, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, piece.max_q, piece.max_k, 0.0, True, False, scale=scale,
            window_size_left=-1, window_size_right=0,
        )  # fmt: skip
        return out, (lse, rng_state, cu_q, cu_k)  # the bounds on the device too: backward copies them no more

    def backward(self, dout, q, k, v, out, saved, piece: Piece, scale: float):
        lse, rng_state, cu_q, cu_k = saved
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, piece.max_q, piece.max_k, 0.0, True, rng_state,
            torch.empty(0, device=q.device), scale=scale, window_size_left=-1, window_size_right=0,
        )  # fmt: skip


def _cu(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def reference_piece(q, k, v, piece: Piece, scale: float) -> torch.Tensor:
    """Plain torch attention of one piece in float32 or wider: each document's queries over its keys, causal
    aligned at the bottom right (query i of n sees keys up to i + m - n of m). q [tq, H, d], k and v [tk, KV, d]."""
    groups = q.shape[1] // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    parts = []
    for (qa, qb), (ka, kb) in zip(_spans(piece.cu_q), _spans(piece.cu_k), strict=True):
        q_doc = q[qa:qb].to(wide).transpose(0, 1)  # [H, n, d]
        k_doc = k[ka:kb].to(wide).repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, m, d]
        v_doc = v[ka:kb].to(wide).repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, m, d]
        n, m = qb - qa, kb - ka
        allowed = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        scores = (q_doc @ k_doc.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # [H, n, m]
        parts.append((torch.softmax(scores, dim=-1) @ v_doc).transpose(0, 1))  # [n, H, d]
    return torch.cat(parts).to(q.dtype)  # [tq, H, d]


def _spans(cu: tuple[int, ...]) -> list[tuple[int, int]]:
    return list(zip(cu[:-1], cu[1:], strict=True))


class _Reference:
    """``reference_piece`` as a piece kernel: backward recomputes it under autograd."""

    def forward(self, q, k, v, piece: Piece, scale: float):
        return reference_piece(q, k, v, piece, scale), None

    def backward(self, dout, q, k, v, out, saved, piece: Piece, scale: float):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            recomputed = reference_piece(q, k, v, piece, scale)
        return torch.autograd.grad(recomputed, (q, k, v), dout)


FLASH: PieceKernel = _Flash()
REFERENCE: PieceKernel = _Reference()


class PiecewiseAttention(torch.autograd.Function):
    """Causal attention within documents over ``pieces``: q [T, H, d], k and v [T, KV, d] -> [T, H, d]."""

    @staticmethod
    def forward(ctx, q, k, v, pieces: list[Piece], scale: float, kernel: PieceKernel):
        out = torch.empty_like(q)  # [T, H, d]
        saved = []
        for p in pieces:
            piece_out, piece_saved = kernel.forward(q[p.q_start : p.q_stop], k[p.k_start : p.q_stop],
                                                    v[p.k_start : p.q_stop], p, scale)  # fmt: skip
            out[p.q_start : p.q_stop].copy_(piece_out)
            saved.append(piece_saved)
        ctx.save_for_backward(q, k, v, out)
        ctx.pieces, ctx.scale, ctx.kernel, ctx.piece_saved = pieces, scale, kernel, saved
        return out

    @staticmethod
    def backward(ctx, dout):  # dout [T, H, d]
        q, k, v, out = ctx.saved_tensors
        dq = torch.empty_like(q)  # [T, H, d]
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # [T, KV, d]: a split document's keys get several pieces
        for p, piece_saved in zip(ctx.pieces, ctx.piece_saved, strict=True):
            queries, keys = slice(p.q_start, p.q_stop), slice(p.k_start, p.q_stop)
            grads = ctx.kernel.backward(dout[queries].contiguous(), q[queries], k[keys], v[keys], out[queries],
                                        piece_saved, p, ctx.scale)  # fmt: skip
            piece_dq, piece_dk, piece_dv = grads
            dq[queries].copy_(piece_dq)
            dk[keys] += piece_dk
            dv[keys] += piece_dv
        return dq, dk, dv, None, None, None


def piecewise_attention(q, k, v, pieces: list[Piece], scale: float, kernel: PieceKernel = FLASH) -> torch.Tensor:
    """Causal attention within documents, one kernel call per piece (``plan_pieces``): q [T, H, d], k and v
    [T, KV, d] -> [T, H, d]."""
    return PiecewiseAttention.apply(q, k, v, pieces, scale, kernel)
