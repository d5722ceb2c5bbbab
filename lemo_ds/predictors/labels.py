"""Training labels for the predictors: the oracle's block scores and block-pair tiles of one layer input.

The scores and tiles come from the oracle scorer's adapter (``lemo_ds.scorers.oracle.oracle_block_scores``, with
tiles): the layer's own queries and keys, under the model's 4D mask where it has one (padding, packed documents,
sliding windows), else the row's document ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lemo_ds.core.selection import num_blocks
from lemo_ds.score_context import ScoreContext
from lemo_ds.scorers.oracle import oracle_block_scores


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


@torch.no_grad()
def oracle_labels(
    layer: nn.Module,
    hidden_states: torch.Tensor,  # [b, s, h], the layer input
    context: ScoreContext,
    backend: str = "auto",
) -> OracleLabels:
    """The oracle's scores and tiles for ``hidden_states`` at ``layer`` (no gradients)."""
    scores, tiles = oracle_block_scores(layer, hidden_states, context, backend, return_tiles=True)
    mask = context.attention_mask  # [b or 1, 1, s, s] or None
    if mask is None:
        return OracleLabels(scores, tiles, context.first_key_block())
    return OracleLabels(scores, tiles, lo_block_from_mask(mask, context.block_size, hidden_states.shape[1]))
