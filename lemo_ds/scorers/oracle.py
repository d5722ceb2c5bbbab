"""Oracle scorer: true block informativeness from the layer's own queries and keys (LeMo's definition).

For query token i and key token j, the pair score is the head-average of the positive parts of the scaled
query-key products, ``a(i, j) = mean_h relu(q_i^h . k_j^h / sqrt(d))``, over the pairs the layer's attention
allows (causal, same document, not padding). A tile of B x B pairs (query block I, key block J) scores
``max_{i in I, j in J} a(i, j)``, and key block J scores the sum of its tiles down the column.

This is the chunked PyTorch implementation: it walks over chunks of query rows and, within a chunk, over
key/value head groups, so its working memory is O(chunk x seq) and never O(seq^2); keys past the chunk's
last row are skipped because causality masks them. The fused Triton kernel (``lemo_ds.kernels.oracle_scores``)
serves the layers without a mask tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lemo_ds.kernels import oracle_scores
from lemo_ds.scorers.base import BlockScorer, ScoreContext, allowed_pairs
from lemo_ds.selection import num_blocks


def oracle_block_scores(
    query: torch.Tensor,  # [b, H, s, d] after RoPE
    key: torch.Tensor,  # [b, KV, s, d] after RoPE
    block_size: int,
    attention_mask: torch.Tensor | None = None,  # [b or 1, 1, s, s] bool/additive, or None (causal)
    chunk_tokens: int = 512,
) -> torch.Tensor:
    """[b, n_blocks] float32 block scores (see the module docstring)."""
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    block = block_size
    n = num_blocks(seq, block)
    chunk = max(block, math.ceil(chunk_tokens / block) * block)
    scale = head_dim**-0.5
    grouped = query.view(batch, kv_heads, groups, seq, head_dim)  # [b, KV, G, s, d]
    scores = torch.zeros(batch, n, dtype=torch.float32, device=query.device)  # [b, n]
    for start in range(0, seq, chunk):
        stop = min(start + chunk, seq)
        keys = stop  # causal: no key after the chunk's last query row can be attended
        pair = torch.zeros(batch, stop - start, keys, dtype=torch.float32, device=query.device)  # [b, cq, keys]
        for g in range(kv_heads):
            q = grouped[:, g, :, start:stop]  # [b, G, cq, d]
            k = key[:, g, :keys]  # [b, keys, d]
            logits = torch.matmul(q, k.transpose(-1, -2)[:, None])  # [b, G, cq, keys]
            pair += logits.float().clamp_min_(0.0).sum(1)
        pair.mul_(scale / heads)
        pair.masked_fill_(~allowed_pairs(attention_mask, slice(start, stop), keys, batch, query.device), 0.0)
        # Tile max over B x B tiles, then the column sum over this chunk's query blocks.
        q_blocks, k_blocks = num_blocks(stop - start, block), num_blocks(keys, block)
        pair = F.pad(pair, (0, k_blocks * block - keys, 0, q_blocks * block - (stop - start)))
        tiles = pair.view(batch, q_blocks, block, k_blocks, block).amax(dim=(2, 4))  # [b, qb, kb]
        scores[:, :k_blocks] += tiles.sum(1)
    return scores


def oracle_block_scores_ref(
    query: torch.Tensor, key: torch.Tensor, block_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Unchunked reference: materialises the whole [b, s, s] pair matrix. For tests on small shapes only."""
    batch, heads, seq, head_dim = query.shape
    groups = heads // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # [b, H, s, d]
    pair = (query.float() @ k.float().transpose(-1, -2) / math.sqrt(head_dim)).clamp_min(0).mean(1)  # [b, s, s]
    pair = pair.masked_fill(~allowed_pairs(attention_mask, slice(0, seq), seq, batch, query.device), 0.0)
    n = num_blocks(seq, block_size)
    pad = n * block_size - seq
    pair = F.pad(pair, (0, pad, 0, pad))
    return pair.view(batch, n, block_size, n, block_size).amax(dim=(2, 4)).sum(1)


class OracleScorer(BlockScorer):
    """Causal attention, plain or within documents (``context.documents``: packed rows, padding), takes
    ``lemo_ds.kernels.oracle_scores`` (the fused Triton kernel where it runs, its chunked torch path elsewhere); a
    layer given a mask tensor (eager attention) takes the chunked PyTorch path above, which reads the mask as it
    is (whatever it encodes)."""

    name = "oracle"

    def __init__(self, chunk_tokens: int, kernels: str = "auto") -> None:
        self.chunk_tokens = chunk_tokens
        self.kernels = kernels

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        query, key = context.policy.query_key_states(layer, hidden_states, context.position_embeddings)
        doc_ids = context.doc_ids()  # [b, s] packed documents or padding, without a mask tensor
        if doc_ids is not None:
            return oracle_scores(query, key, context.block_size, doc_ids=doc_ids, backend=self.kernels)
        if context.attention_mask is None and self.kernels != "torch":
            return oracle_scores(query, key, context.block_size, backend=self.kernels)
        return oracle_block_scores(query, key, context.block_size, context.attention_mask, self.chunk_tokens)
