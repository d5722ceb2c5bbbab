"""Training labels for the predictors: the oracle's block scores and block-pair tiles of one layer input.

The queries and keys come from the layer itself (``policy.query_key_states``: the layer's input norm, q/k
projections, per-head norms where the family has them, RoPE), the tiles from the fused oracle kernel
(``lemo_ds.kernels.oracle_scores(..., return_tiles=True)``) when attention is plain causal, or from a chunked
PyTorch pass that reads the model's 4D mask as it is (padding, packed documents, sliding windows) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lemo_ds.kernels import oracle_scores
from lemo_ds.score_context import ScoreContext, allowed_pairs
from lemo_ds.selection import num_blocks


@dataclass
class OracleLabels:
    scores: torch.Tensor  # [b, n] float32: the oracle's block scores S(J)
    tiles: torch.Tensor  # [b, n, n] float32: its tile maxima T(I, J), zero above the diagonal and where masked
    lo_block: torch.Tensor | None  # [b, n] int64: first key block each query block reaches, or None (causal)


def lo_block_from_mask(mask: torch.Tensor | None, block_size: int, seq: int) -> torch.Tensor | None:
    """[b, n] int64: for each query block, the first key block its first or last row attends (min of the two;
    the union of a block's rows' ranges starts there for causal masks with documents). None without a mask.

    Reads 2n rows of the mask (O(n s)), never the whole [s, s] matrix."""
    if mask is None:
        return None
    n = num_blocks(seq, block_size)
    first = torch.arange(n, device=mask.device) * block_size  # [n]
    last = torch.clamp(first + block_size - 1, max=seq - 1)  # [n]
    rows = mask[:, 0, torch.cat([first, last]), :seq]  # [b or 1, 2n, s]
    allowed = rows if rows.dtype == torch.bool else rows == 0
    has_any = allowed.any(-1)  # [b or 1, 2n]
    first_key = torch.where(has_any, allowed.int().argmax(-1), seq)  # [b or 1, 2n], seq = reaches nothing
    lo = torch.minimum(first_key[:, :n], first_key[:, n:]) // block_size  # [b or 1, n]
    return lo.long()


def masked_oracle_tiles(
    query: torch.Tensor,  # [b, H, s, d] after RoPE
    key: torch.Tensor,  # [b, KV, s, d] after RoPE
    block_size: int,
    attention_mask: torch.Tensor,  # [b or 1, 1, s, s] bool (True = attend) or additive float
    chunk_tokens: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [b, n], tiles [b, n, n]) under an explicit mask: query rows in chunks of whole blocks, one KV
    head group at a time, so the working memory is O(chunk x s x G) (as the oracle scorer's chunked path)."""
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    n = num_blocks(seq, block_size)
    chunk = max(1, math.ceil(chunk_tokens / block_size)) * block_size
    tiles = torch.zeros(batch, n, n, dtype=torch.float32, device=query.device)  # [b, n, n]
    for start in range(0, seq, chunk):
        stop = min(start + chunk, seq)
        pair = torch.zeros(batch, stop - start, stop, dtype=torch.float32, device=query.device)  # [b, cq, keys]
        for g in range(kv_heads):
            q = query[:, g * groups : (g + 1) * groups, start:stop]  # [b, G, cq, d]
            logits = torch.matmul(q, key[:, g, :stop].transpose(-1, -2)[:, None])  # [b, G, cq, keys]
            pair += logits.float().clamp_min_(0.0).sum(1)
        pair.mul_(head_dim**-0.5 / heads)
        pair.masked_fill_(~allowed_pairs(attention_mask, slice(start, stop), stop, batch, query.device), 0.0)
        qb, kb = num_blocks(stop - start, block_size), num_blocks(stop, block_size)
        pair = F.pad(pair, (0, kb * block_size - stop, 0, qb * block_size - (stop - start)))
        first = start // block_size
        tiles[:, first : first + qb, :kb] = pair.view(batch, qb, block_size, kb, block_size).amax(dim=(2, 4))
    return tiles.sum(1), tiles


@torch.no_grad()
def oracle_labels(
    layer: nn.Module,
    hidden_states: torch.Tensor,  # [b, s, h], the layer input
    context: ScoreContext,
    backend: str = "auto",
) -> OracleLabels:
    """The oracle's scores and tiles for ``hidden_states`` at ``layer`` (no gradients)."""
    query, key = context.policy.query_key_states(layer, hidden_states, context.position_embeddings)
    mask = context.attention_mask
    if mask is None:
        scores, tiles = oracle_scores(query, key, context.block_size, doc_ids=context.doc_ids(), return_tiles=True,
                                      backend=backend)  # fmt: skip
        return OracleLabels(scores, tiles, context.first_key_block())
    scores, tiles = masked_oracle_tiles(query, key, context.block_size, mask)
    return OracleLabels(scores, tiles, lo_block_from_mask(mask, context.block_size, hidden_states.shape[1]))
