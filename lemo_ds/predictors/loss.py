"""The predictors' training loss: tile regression, optionally plus a ranking term on the blocks the selection decides.

The ranking term is off by default (``lemo.predictor.rank_weight`` 0): on the accuracy benchmark's model it lowered
recall (0.939 without it, 0.916 at weight 1) and left few query units alive. It stays available.

- Tiles (LeMo's loss): SmoothL1 between the predicted tiles and the oracle's, the latter divided per sample by
  their mean over the allowed block pairs, so every layer and sequence length trains in the same unit. It gives
  every block pair a dense target, which shapes q^ and k^.
- Ranking: the selection only reads the order of the block scores, and only near the cut. A pairwise logistic
  loss on log scores, over every (kept, dropped) pair of the oracle's choice (forced blocks left out), pushes
  each kept block above each dropped one; in log space it is scale-free, so a layer whose tiles regress well
  in absolute terms but misorder small scores (late blocks, short columns) still gets a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lemo_ds.predictors.labels import OracleLabels
from lemo_ds.predictors.module import block_pair_allowed
from lemo_ds.predictors.recall import chosen_mask

LOG_EPS = 1e-2  # in units of the mean tile: keeps log() finite for blocks predicted at zero
RANK_TEMPERATURE = 0.1  # a 10% score ratio between a kept and a dropped block costs softplus(-1)


def normalized_tiles(labels: OracleLabels) -> tuple[torch.Tensor, torch.Tensor]:
    """(oracle tiles / their per-sample mean over the allowed pairs [b, n, n], allowed pairs [b, n, n] bool)."""
    batch, n, _ = labels.tiles.shape
    allowed = block_pair_allowed(labels.lo_block, n, batch, labels.tiles.device)
    mean = (labels.tiles * allowed).sum((1, 2)) / allowed.sum((1, 2)).clamp_min(1)  # [b]
    return labels.tiles / mean.clamp_min(1e-12)[:, None, None], allowed


def ranking_loss(predicted: torch.Tensor, oracle: torch.Tensor, choose: int, forced: list[int]) -> torch.Tensor:
    """Mean softplus(-(log S^_kept - log S^_dropped) / temperature) over the oracle's (kept, dropped) pairs."""
    kept = chosen_mask(oracle, choose, forced)  # [b, n]
    dropped = ~kept
    if forced:
        dropped[:, forced] = False
    z = torch.log(predicted.clamp_min(0) + LOG_EPS)  # [b, n]
    margin = (z[:, :, None] - z[:, None, :]) / RANK_TEMPERATURE  # [b, n, n]: (kept i, dropped j)
    pairs = kept[:, :, None] & dropped[:, None, :]
    if not pairs.any():
        return predicted.sum() * 0.0
    return F.softplus(-margin[pairs]).mean()


def predictor_loss(
    pred_tiles: torch.Tensor,  # [b, n, n]
    pred_scores: torch.Tensor,  # [b, n]
    labels: OracleLabels,
    choose: int,
    forced: list[int],
    rank_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, its parts as floats)."""
    target, allowed = normalized_tiles(labels)
    # The mean over the allowed pairs without selecting them: the predictor's tiles are zero elsewhere, and so is the
    # target once masked, so those pairs add 0. A boolean selection would synchronise with the host and send its
    # gradient back through an index kernel at every update.
    count = allowed.sum().clamp_min(1)
    tile = F.smooth_l1_loss(pred_tiles, target * allowed, reduction="sum") / count
    rank = ranking_loss(pred_scores, labels.scores, choose, forced) if rank_weight > 0 else tile * 0.0
    loss = tile + rank_weight * rank
    return loss, {"loss": float(loss.detach()), "tile_loss": float(tile.detach()), "rank_loss": float(rank.detach())}
