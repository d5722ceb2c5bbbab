"""The selection rule and the oracle's chunked torch path under a model's 4D mask."""

from __future__ import annotations

import math

import pytest
import torch

from lemo_ds.core.selection import forced_blocks, keep_block_count, num_blocks, select_blocks, token_index
from lemo_ds.kernels import oracle_scores, oracle_scores_ref


def test_keep_count_follows_the_contract():
    assert keep_block_count(10, 0.4, 1, 1) == 4
    assert keep_block_count(10, 0.01, 1, 1) == 1  # at least min_blocks
    assert keep_block_count(10, 0.01, 3, 1) == 3
    assert keep_block_count(10, 0.1, 1, 2) == 2  # forced blocks count toward the total
    assert keep_block_count(10, 0.4, 50, 1) == 10  # never more than there are


def test_forced_blocks():
    assert forced_blocks(64, 8, [0]) == [0]
    assert forced_blocks(64, 8, [0, -1, 99]) == [0, 7]  # -1 is the last block; 99 does not exist
    assert forced_blocks(70, 8, [0]) == [0, 8]  # a partial tail block is always kept


def test_select_blocks_top_k_plus_forced_sorted():
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 3.0, float("nan")], [6.0, 0.0, 7.0, 1.0, 2.0, 8.0]])
    kept = select_blocks(scores, keep=3, forced=[0])
    assert kept.tolist() == [[0, 1, 3], [0, 2, 5]]
    assert kept.dtype == torch.int64


def test_token_index_with_a_partial_tail_block():
    blocks = torch.tensor([[0, 2, 3], [1, 2, 3]])  # 3 blocks of 4 out of ceil(14 / 4) = 4
    rows = token_index(torch.tensor([[0, 2, 3], [0, 1, 3]]), 4, 14)
    assert rows.tolist() == [[0, 1, 2, 3, 8, 9, 10, 11, 12, 13], [0, 1, 2, 3, 4, 5, 6, 7, 12, 13]]
    assert token_index(blocks, 4, 16).shape == (2, 12)
    assert num_blocks(14, 4) == 4


def _causal_packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    starts = (position_ids == 0).long()
    doc = starts.cumsum(1)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "seq", "dim", "block", "chunk"),
    [(1, 1, 1, 1, 4, 8, 8), (2, 4, 2, 37, 8, 8, 16), (1, 6, 2, 130, 16, 16, 48), (3, 4, 4, 64, 8, 64, 512)],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 0.05, 0.02)])
def test_chunked_oracle_matches_the_unchunked_reference(
    batch, heads, kv_heads, seq, dim, block, chunk, masked, dtype, atol, rtol
):
    generator = torch.Generator().manual_seed(seq)
    query = torch.randn(batch, heads, seq, dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, seq, dim, generator=generator).to(dtype)
    mask = None
    if masked:
        positions = torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).expand(batch, -1)
        mask = _causal_packed_mask(positions)
        mask[0, 0, :, -2:] = False  # a padded tail in sample 0
    ours = oracle_scores(query, key, block, mask, backend="torch", chunk_tokens=chunk)
    reference = oracle_scores_ref(query, key, block, mask)
    assert ours.shape == (batch, num_blocks(seq, block)) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=atol, rtol=rtol)


def test_additive_float_masks_mean_the_same_as_bool_masks():
    query, key = torch.randn(1, 2, 24, 4), torch.randn(1, 2, 24, 4)
    mask = _causal_packed_mask(torch.cat([torch.arange(10), torch.arange(14)])[None])
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(oracle_scores(query, key, 8, additive), oracle_scores(query, key, 8, mask))


def test_oracle_prefers_the_block_every_query_attends_to():
    seq, dim = 64, 8
    key = torch.randn(1, 1, seq, dim) * 0.1
    query = torch.randn(1, 1, seq, dim) * 0.1
    direction = torch.randn(dim)
    key[0, 0, 20] = direction * 3  # a key in block 2 that every later query matches strongly
    query[0, 0, 20:] += direction
    scores = oracle_scores(query, key, 8)
    assert scores.argmax().item() == 2


# ---- stratified selection (lemo selection_window) ---------------------------------------------------------


@pytest.mark.parametrize(("n", "window", "keep"), [(32, 8, 13), (37, 8, 15), (16, 4, 4), (10, 3, 5)])
def test_stratified_selection_spreads_the_kept_blocks_over_every_window(n, window, keep):
    from lemo_ds.core.selection import stratified_priority

    generator = torch.Generator().manual_seed(n + window)
    # Column-sum-like scores: early blocks score far higher, so a global top-k keeps only early blocks.
    scores = torch.rand(3, n, generator=generator) + torch.linspace(10.0, 0.0, n)  # [b, n]
    kept = select_blocks(stratified_priority(scores, window), keep, forced=[])  # [b, k]
    assert kept.shape == (3, keep)
    for b in range(3):
        per_window = torch.bincount(kept[b] // window, minlength=math.ceil(n / window))
        full = per_window[: n // window]
        assert full.max() - full.min() <= 1, per_window  # every full window keeps its share, within one block
        for w in range(math.ceil(n / window)):  # inside a window, the scorer's best blocks
            members = torch.arange(w * window, min((w + 1) * window, n))
            chosen = [i for i in kept[b].tolist() if i in members.tolist()]
            best = scores[b, members].topk(len(chosen)).indices + w * window
            assert sorted(chosen) == sorted(best.tolist())
    global_kept = select_blocks(scores, keep, forced=[])
    assert global_kept.max() < n // 2  # the global top-k would have kept the first half only


def test_one_window_over_the_whole_sequence_is_the_global_top_k():
    from lemo_ds.core.selection import stratified_priority

    scores = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_blocks(stratified_priority(scores, 32), 7, [0]), select_blocks(scores, 7, [0]))
