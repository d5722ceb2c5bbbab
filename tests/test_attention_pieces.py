"""lemo_ds.attention_pieces: flash attention in calls under the 32-bit limit, checked at small sizes with a small limit.

The plan covers every query once, within the limit, and splits a document only when it is too long for one call.
The pieces' composition (``piecewise_attention`` with the plain-torch kernel, on the CPU) equals attention with an
explicit mask over the whole tensor, forward and every gradient; on CUDA the flash kernel's pieces equal one
varlen_attn call, and document_attention takes the pieces past the limit. tests/test_large_tensors.py checks the
real limit on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import packed_position_ids

from lemo_ds import attention_pieces
from lemo_ds.attention_pieces import (
    REFERENCE,
    Piece,
    accumulator_rows,
    key_chunks,
    plan_pieces,
    reference_backward,
    reference_lse,
    reference_piece,
)
from lemo_ds.document_attention import document_attention, varlen_causal
from lemo_ds.documents import Documents

HEADS, KV_HEADS, DIM = 4, 2, 16
# Limits in accumulator rows (tokens plus flash's 128 per document) of 4 x 64 elements (heads x rounded head dim).
SMALL_ROWS = 2 * 128 + 7  # two documents of 7 tokens in all; a document past 135 tokens split into pieces of 128
LAYOUTS = {
    "short-documents": [3, 2, 1, 4, 2, 5, 1],
    "one-long-document": [300],
    "long-among-short": [2, 170, 3, 1, 140],
}


def _cu(lengths: list[int]) -> list[int]:
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def _limit(rows: int) -> int:
    return rows * HEADS * 64


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_covers_every_query_once_within_the_limit(layout):
    lengths = LAYOUTS[layout]
    cu = _cu(lengths)
    rows = accumulator_rows(HEADS, DIM, _limit(SMALL_ROWS))
    assert rows == SMALL_ROWS
    pieces = plan_pieces(cu, HEADS, DIM, _limit(SMALL_ROWS))
    assert [i for p in pieces for i in range(p.q_start, p.q_stop)] == list(range(cu[-1]))  # every query once
    split_starts = {start for start, n in zip(cu, lengths) if n + 128 > rows}  # documents too long for one call
    for p in pieces:
        assert (p.q_stop - p.q_start) + 128 * (len(p.cu_q) - 1) <= rows  # within the limit
        assert p.cu_q[-1] == p.q_stop - p.q_start and p.cu_k[-1] == p.q_stop - p.k_start
        if p.k_start in split_starts:  # a piece of a split document: its keys from the document's start
            assert len(p.cu_q) == 2 and p.q_stop <= next(b for b in cu if b > p.k_start)
        else:  # whole documents, the same for queries and keys
            assert p.k_start == p.q_start and p.cu_q == p.cu_k
            assert cu[cu.index(p.q_start) : cu.index(p.q_start) + len(p.cu_q)] == [p.q_start + b for b in p.cu_q]
    for a, b in zip(pieces[:-1], pieces[1:]):  # fewest calls: no whole-document piece could take the next document
        if a.k_start not in split_starts and b.k_start not in split_starts:
            first = b.cu_q[1]
            assert (a.q_stop - a.q_start) + first + 128 * len(a.cu_q) > rows
    assert any(p.k_start in split_starts for p in pieces) == bool(split_starts)


def test_plan_keeps_one_call_under_the_limit_and_refuses_heads_that_cannot_fit():
    cu = _cu([5, 6, 7])
    assert plan_pieces(cu, HEADS, DIM) == [Piece(0, 18, 0, (0, 5, 11, 18), (0, 5, 11, 18))]
    with pytest.raises(ValueError, match="cannot fit one row"):
        plan_pieces(cu, HEADS, DIM, limit=_limit(200))


def test_needs_pieces_counts_the_padding_rows():
    rows = accumulator_rows(32, 128)
    assert rows == (2**31 - 1) // 4096
    assert attention_pieces.needs_pieces(524_288, 1, 32, 128)  # 512K tokens of one document: 128 rows too many
    assert not attention_pieces.needs_pieces(rows - 128, 1, 32, 128)
    assert attention_pieces.needs_pieces(rows - 128, 2, 32, 128)


@pytest.mark.parametrize("lengths", [[1024] * 512 + [64], [524_352]], ids=["packed", "one-document"])
def test_the_jobs_pieces_at_512k_stay_under_the_piece_limit(lengths):
    # What document_attention plans for the H100's 512K + 64 tokens (Llama-3-8B's 32 x 128 query heads).
    cu = _cu(lengths)
    assert attention_pieces.needs_pieces(cu[-1], len(lengths), 32, 128)
    pieces = plan_pieces(cu, 32, 128, attention_pieces.PIECE_ELEMENT_LIMIT)
    assert pieces[0].q_start == 0 and pieces[-1].q_stop == cu[-1]
    assert all(a.q_stop == b.q_start for a, b in zip(pieces[:-1], pieces[1:]))
    rows = accumulator_rows(32, 128, attention_pieces.PIECE_ELEMENT_LIMIT)
    assert all((p.q_stop - p.q_start) + 128 * (len(p.cu_q) - 1) <= rows for p in pieces)
    if len(lengths) > 1:  # whole documents, as many to a piece as fit: 1,152 rows each
        assert len(pieces) == -(-len(lengths) // (rows // (1024 + 128)))
    else:  # queries in runs of the longest multiple of 128 that fits with the document's 128 rows
        assert len(pieces) == -(-lengths[0] // ((rows - 128) // 128 * 128))


def _masked_attention(q, k, v, lengths: list[int], scale: float):
    """Attention over [T, H, d] with an explicit [T, T] mask (causal within each document), in float64."""
    tokens = q.shape[0]
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [T]
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril() & (document[:, None] == document[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale)  # fmt: skip
    return out[0].transpose(0, 1)  # [T, H, d]


def _random_qkv(tokens: int, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, h, DIM, generator=generator).to(device, dtype).requires_grad_()
            for h in (HEADS, KV_HEADS, KV_HEADS)]  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)])
def test_pieces_equal_masked_attention_forward_and_every_gradient(layout, dtype, atol, rtol):
    lengths = LAYOUTS[layout]
    pieces = plan_pieces(_cu(lengths), HEADS, DIM, _limit(SMALL_ROWS))
    assert len(pieces) > 1
    q, k, v = _random_qkv(sum(lengths), dtype)
    out = attention_pieces.piecewise_attention(q, k, v, pieces, DIM**-0.5, kernel=REFERENCE)
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = _masked_attention(*reference, lengths, DIM**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), reference)
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(ours.double(), theirs, atol=atol * 10, rtol=rtol, msg=name)


def test_reference_piece_aligns_causal_at_the_bottom_right():
    # The last 5 queries of a 12-token document over its 12 keys: the rows of full causal attention.
    q, k, v = _random_qkv(12, torch.float64)
    full = _masked_attention(q, k, v, [12], DIM**-0.5)
    last = reference_piece(q[-5:], k, v, Piece(7, 12, 0, (0, 5), (0, 12)), DIM**-0.5)
    torch.testing.assert_close(last, full[-5:])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_key_chunks_cover_a_pieces_keys_in_order_and_no_longer_than_a_piece(layout):
    pieces = plan_pieces(_cu(LAYOUTS[layout]), HEADS, DIM, _limit(SMALL_ROWS))
    longest = max(p.q_stop - p.q_start for p in pieces)
    for p in pieces:
        chunks = key_chunks(p, longest)
        last = chunks[-1]
        assert (last.start, last.stop, last.causal) == (p.q_start, p.q_stop, True)  # the piece's own keys, causal
        assert all(c.cu[0] == 0 and c.cu[-1] == c.stop - c.start for c in chunks)  # bounds relative to the chunk
        assert len(chunks) > 1 or last.cu == p.cu_k  # whole documents keep their documents' bounds
        assert [c.start for c in chunks] == [p.k_start, *(c.stop for c in chunks[:-1])]  # every key once, in order
        assert all(c.stop - c.start <= longest and not c.causal for c in chunks[:-1])  # earlier keys: all visible
        assert (len(chunks) > 1) == (p.k_start < p.q_start)  # chunks only where a split document has earlier keys
    assert any(len(key_chunks(p, longest)) > 2 for p in pieces) == (layout == "one-long-document")


@pytest.mark.parametrize("causal_keys", [(0, 37), (0, 29)], ids=["whole-keys", "bottom-right"])
def test_reference_backward_is_the_gradient_of_reference_piece(causal_keys):
    """reference_backward over a piece's keys, from its out and log-sum-exp, is autograd's gradient of
    reference_piece: three documents with as many queries as keys, or the last 17 queries of one over its 29 keys."""
    q, k, v = _random_qkv(37, torch.float64)
    if causal_keys == (0, 29):
        piece, q_rows = Piece(12, 29, 0, (0, 17), (0, 29)), slice(12, 29)
    else:
        piece, q_rows = Piece(0, 37, 0, (0, 10, 11, 37), (0, 10, 11, 37)), slice(0, 37)
    keys = slice(*causal_keys)
    out = reference_piece(q[q_rows], k[keys], v[keys], piece, DIM**-0.5)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    lse = reference_lse(q[q_rows].detach(), k[keys].detach(), piece, DIM**-0.5)
    ours = reference_backward(dout, *(t.detach() for t in (q[q_rows], k[keys], v[keys], out)), lse, piece.cu_q,
                              piece.cu_k, True, DIM**-0.5)  # fmt: skip
    for name, got, want in zip("qkv", ours, (expected[0][q_rows], expected[1][keys], expected[2][keys]), strict=True):
        torch.testing.assert_close(got, want, msg=name)


# ---- CUDA: torch's flash kernels in pieces ----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flash kernels run on CUDA only")


@cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flash_pieces_equal_one_varlen_call(layout):
    lengths = [n * 8 for n in LAYOUTS[layout]]
    cu = _cu(lengths)
    pieces = plan_pieces(cu, HEADS, DIM, _limit(SMALL_ROWS * 2))  # a few pieces, long documents split
    assert len(pieces) > 1
    q, k, v = _random_qkv(cu[-1], torch.bfloat16, "cuda")
    out = attention_pieces.piecewise_attention(q, k, v, pieces, DIM**-0.5)
    alone = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    cu_tensor = torch.tensor(cu, dtype=torch.int32, device="cuda")
    expected = varlen_causal(*alone, cu_tensor, cu_tensor, max(lengths), max(lengths), DIM**-0.5)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, alone, dout)
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=5e-2, rtol=2e-2, msg=name)


@cuda
@pytest.mark.parametrize("lengths", [[1600], [400, 200, 1000]], ids=["one-document", "packed"])
def test_document_attention_takes_pieces_past_the_limit(monkeypatch, lengths):
    monkeypatch.setattr(attention_pieces, "FLASH_ELEMENT_LIMIT", _limit(SMALL_ROWS * 4))  # 1052 rows: both pass it
    monkeypatch.setattr(attention_pieces, "PIECE_ELEMENT_LIMIT", _limit(SMALL_ROWS * 2))
    planned = []
    plan = attention_pieces.plan_pieces
    monkeypatch.setattr(attention_pieces, "plan_pieces", lambda *args: planned.append(plan(*args)) or planned[-1])
    seq = sum(lengths)
    q, k, v = (t.detach()[None].transpose(1, 2).requires_grad_() for t in _random_qkv(seq, torch.bfloat16, "cuda"))
    documents = Documents.from_inputs(packed_position_ids(1, lengths), None, 1, seq, torch.device("cuda"))

    class Module(torch.nn.Module):  # what Hugging Face's SDPA reads of an attention module
        is_causal = True
        num_key_value_groups = HEADS // KV_HEADS

    out, _ = document_attention(Module(), q, k, v, documents, scaling=DIM**-0.5)  # [1, s, H, d]
    assert planned and len(planned[0]) > 1, "document_attention did not take the pieces past the limit"
    reference = [t[0].transpose(0, 1).detach().double().cpu().requires_grad_() for t in (q, k, v)]  # [s, H, d]
    expected = _masked_attention(*reference, lengths, DIM**-0.5)
    torch.testing.assert_close(out[0].double().cpu(), expected, atol=2e-2, rtol=2e-2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, reference, dout[0].double().cpu())
    for name, ours, theirs in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(ours[0].transpose(0, 1).double().cpu(), theirs, atol=5e-2, rtol=2e-2, msg=name)
