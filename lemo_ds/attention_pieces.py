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
  alignment when a call has fewer queries than keys. Forward is one call per piece. Backward runs such a piece in key
  chunks (``key_chunks``): the keys before the piece's queries in runs no longer than a piece, all visible, then the
  piece's own keys, causal. Each call gets the piece's whole output and log-sum-exp, so its probabilities and its
  rowsum(dout * out) are the piece's own and its gradients are exact parts of the piece's; the query gradients add up
  in float32. One call over all of a long document's keys would hold, for grouped-query heads, dk and dv expanded to
  every query head over the whole document (8 GiB at 512K tokens of Llama-3-8B's heads), where a chunk holds a
  piece's worth.

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


@dataclass(frozen=True)
class KeyChunk:
    """Keys [start, stop) of the flattened tokens for one backward call of a piece, documents ``cu`` relative to
    ``start``: causal over the piece's own queries (the piece's own keys), or every key visible to every query (keys
    before the piece's queries)."""

    start: int
    stop: int
    cu: tuple[int, ...]
    causal: bool


def key_chunks(piece: Piece, longest: int) -> list[KeyChunk]:
    """The backward calls of ``piece``: one causal call over its keys where it has no keys before its queries (whole
    documents, or a split document's first piece); otherwise the earlier keys in runs of at most ``longest`` tokens,
    then the piece's own keys."""
    if piece.k_start == piece.q_start:
        return [KeyChunk(piece.k_start, piece.q_stop, piece.cu_k, True)]
    starts = range(piece.k_start, piece.q_start, longest)
    chunks = [KeyChunk(a, b, (0, b - a), False) for a, b in ((a, min(a + longest, piece.q_start)) for a in starts)]
    return [*chunks, KeyChunk(piece.q_start, piece.q_stop, (0, piece.q_stop - piece.q_start), True)]


class PieceKernel(Protocol):
    def forward(self, q, k, v, piece: Piece, scale: float) -> tuple[torch.Tensor, Any]:
        """(out [tq, H, d], what backward needs besides the inputs and out) of one piece: q [tq, H, d], k and v
        [tk, KV, d]."""

    def backward(self, dout, q, k, v, out, saved: Any, cu_q: tuple[int, ...], cu_k: tuple[int, ...], causal: bool,
                 scale: float):  # fmt: skip
        """(dq, dk, dv) of a piece's queries q [tq, H, d] over keys k and v [tk, KV, d] (all of the piece's, or one
        ``KeyChunk``: documents ``cu_k``; ``causal`` False: every key visible), given the piece's whole out and
        ``saved`` (what its forward returned beside out): the parts of the piece's gradients that those keys make."""


class _Flash:
    """torch's flash kernels (the ones ``torch.nn.attention.varlen.varlen_attn`` calls), causal, no dropout."""

    def forward(self, q, k, v, piece: Piece, scale: float):
        cu_q, cu_k = _cu(piece.cu_q, q.device), _cu(piece.cu_k, q.device)
        out, lse, rng_state, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, piece.max_q, piece.max_k, 0.0, True, False, scale=scale,
            window_size_left=-1, window_size_right=0,
        )  # fmt: skip
        # the bounds on the device too (backward copies them no more), and the keys' on the host: a chunk has others
        return out, (lse, rng_state, cu_q, cu_k, piece.cu_k)

    def backward(self, dout, q, k, v, out, saved, cu_q, cu_k, causal: bool, scale: float):
        lse, rng_state, cu_q_device, cu_k_device, piece_cu_k = saved
        if cu_k != piece_cu_k:  # a key chunk: its own bounds
            cu_k_device = _cu(cu_k, q.device)
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q_device, cu_k_device, _longest(cu_q), _longest(cu_k), 0.0, causal, rng_state,
            torch.empty(0, device=q.device), scale=scale, window_size_left=-1, window_size_right=0 if causal else -1,
        )  # fmt: skip


def _cu(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _longest(cu: tuple[int, ...]) -> int:
    return max(b - a for a, b in _spans(cu))


def reference_piece(q, k, v, piece: Piece, scale: float) -> torch.Tensor:
    """Plain torch attention of one piece in float32 or wider: each document's queries over its keys, causal
    aligned at the bottom right (query i of n sees keys up to i + m - n of m). q [tq, H, d], k and v [tk, KV, d]."""
    parts = []
    for span_q, span_k in zip(_spans(piece.cu_q), _spans(piece.cu_k), strict=True):
        scores, allowed = _scores(q, k, span_q, span_k, scale)  # [H, n, m], [n, m]
        v_doc = _heads_first(v, span_k, q.shape[1])  # [H, m, d]
        parts.append((torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v_doc).transpose(0, 1))
    return torch.cat(parts).to(q.dtype)  # [tq, H, d]


def reference_lse(q, k, piece: Piece, scale: float) -> torch.Tensor:
    """The log-sum-exp of ``reference_piece``'s scores, per query and head: [tq, H], float32 or wider."""
    parts = []
    for span_q, span_k in zip(_spans(piece.cu_q), _spans(piece.cu_k), strict=True):
        scores, allowed = _scores(q, k, span_q, span_k, scale)  # [H, n, m], [n, m]
        parts.append(torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1).transpose(0, 1))
    return torch.cat(parts)  # [tq, H]


def reference_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal: bool, scale: float):
    """Plain torch of what a flash backward call computes from the piece's out and log-sum-exp ``lse`` [tq, H]:
    per document, P = exp(q k^T scale - lse) over these keys (causal aligned at the bottom right, or all visible),
    dv = P^T dout, dS = P (dout v^T - rowsum(dout * out)), dq = dS k scale, dk = dS^T q scale; grouped-query heads
    summed into their key head. Returns (dq, dk, dv) in the inputs' dtypes."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = torch.zeros_like(q, dtype=wide), torch.zeros_like(k, dtype=wide), torch.zeros_like(v, dtype=wide)
    for (qa, qb), (ka, kb) in zip(_spans(cu_q), _spans(cu_k), strict=True):
        scores, allowed = _scores(q, k, (qa, qb), (ka, kb), scale)  # [H, n, m], [n, m]
        probs = torch.exp(scores - lse[qa:qb].to(wide).transpose(0, 1)[:, :, None])
        probs = probs.masked_fill(~allowed, 0.0) if causal else probs
        do_doc, o_doc = _heads_first(dout, (qa, qb), heads), _heads_first(out, (qa, qb), heads)  # [H, n, d]
        k_doc, v_doc = _heads_first(k, (ka, kb), heads), _heads_first(v, (ka, kb), heads)  # [H, m, d]
        d_scores = probs * (do_doc @ v_doc.transpose(1, 2) - (do_doc * o_doc).sum(-1, keepdim=True))  # [H, n, m]
        dq[qa:qb] = (d_scores @ k_doc * scale).transpose(0, 1)
        dk[ka:kb] = (d_scores.transpose(1, 2) @ _heads_first(q, (qa, qb), heads) * scale).transpose(0, 1).unflatten(
            1, (-1, groups)).sum(2)  # fmt: skip
        dv[ka:kb] = (probs.transpose(1, 2) @ do_doc).transpose(0, 1).unflatten(1, (-1, groups)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _heads_first(t: torch.Tensor, span: tuple[int, int], heads: int) -> torch.Tensor:
    """Rows ``span`` of t [T, heads or KV, d] as [heads, n, d] in float32 or wider, key heads repeated per group."""
    wide = torch.promote_types(t.dtype, torch.float32)
    return t[span[0] : span[1]].to(wide).repeat_interleave(heads // t.shape[1], dim=1).transpose(0, 1)


def _scores(q, k, span_q: tuple[int, int], span_k: tuple[int, int], scale: float):
    """(scores [H, n, m], allowed [n, m]) of one document: its queries over its keys, causal aligned at the bottom
    right (query i of n sees keys up to i + m - n of m)."""
    heads, n, m = q.shape[1], span_q[1] - span_q[0], span_k[1] - span_k[0]
    scores = _heads_first(q, span_q, heads) @ _heads_first(k, span_k, heads).transpose(1, 2) * scale
    allowed = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
    return scores, allowed


def _spans(cu: tuple[int, ...]) -> list[tuple[int, int]]:
    return list(zip(cu[:-1], cu[1:], strict=True))


class _Reference:
    """``reference_piece`` and ``reference_backward`` as a piece kernel; forward keeps the log-sum-exp as flash's
    does, for backward's calls over key chunks."""

    def forward(self, q, k, v, piece: Piece, scale: float):
        return reference_piece(q, k, v, piece, scale), reference_lse(q, k, piece, scale)

    def backward(self, dout, q, k, v, out, saved, cu_q, cu_k, causal: bool, scale: float):
        return reference_backward(dout, q, k, v, out, saved, cu_q, cu_k, causal, scale)


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
        longest = max(p.q_stop - p.q_start for p in ctx.pieces)
        for p, piece_saved in zip(ctx.pieces, ctx.piece_saved, strict=True):
            queries = slice(p.q_start, p.q_stop)
            piece_dout = dout[queries].contiguous()
            chunks = key_chunks(p, longest)
            piece_dq = None if len(chunks) == 1 else torch.zeros_like(q[queries], dtype=torch.float32)  # [tq, H, d]
            for chunk in chunks:
                keys = slice(chunk.start, chunk.stop)
                chunk_dq, chunk_dk, chunk_dv = ctx.kernel.backward(
                    piece_dout, q[queries], k[keys], v[keys], out[queries], piece_saved, p.cu_q, chunk.cu,
                    chunk.causal, ctx.scale,
                )  # fmt: skip
                if piece_dq is None:
                    dq[queries].copy_(chunk_dq)
                else:
                    piece_dq += chunk_dq
                dk[keys] += chunk_dk
                dv[keys] += chunk_dv
            if piece_dq is not None:
                dq[queries].copy_(piece_dq)
        return dq, dk, dv, None, None, None


def piecewise_attention(q, k, v, pieces: list[Piece], scale: float, kernel: PieceKernel = FLASH) -> torch.Tensor:
    """Causal attention within documents, one kernel call per piece (``plan_pieces``): q [T, H, d], k and v
    [T, KV, d] -> [T, H, d]."""
    return PiecewiseAttention.apply(q, k, v, pieces, scale, kernel)
