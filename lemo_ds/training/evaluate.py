"""Held-out evaluation at the end of a training run: dense perplexity and, with the predictor scorer, recall.

Evaluation runs the model in eval mode, where lemo_ds's sparse layers are dense (unless ``apply_in_eval``): the
perplexity measures what fine-tuning with elimination taught the weights, on every token, as a user would see the
model afterwards. Each data-parallel rank evaluates its share of the held-out rows; the loss is the token-weighted
mean over all of them (sums of per-token losses and of counted tokens are all-reduced, never means of means).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

IGNORE_INDEX = -100


@torch.no_grad()
def heldout_perplexity(engine: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted cross-entropy over ``batches`` (this rank's), all-reduced: eval_loss, eval_ppl, eval_tokens.

    Every rank must pass the same number of batches (the forward passes of ZeRO-3 are collective)."""
    was_training = engine.training
    engine.eval()
    device = next(p for p in engine.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        # The model shifts labels by one inside; the tokens it counts are the next-token labels != -100.
        counted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # []
        loss = engine(**batch).loss  # mean over the counted tokens
        totals += torch.stack([loss.double() * counted, counted.double()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    engine.train(was_training)
    loss_sum, tokens = totals.tolist()
    if tokens == 0:
        return {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 0}
    mean = loss_sum / tokens
    return {"eval_loss": mean, "eval_ppl": math.exp(mean), "eval_tokens": int(tokens)}


def heldout_recall(engine: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The predictors' top-k recall against the oracle on ``batches`` (model frozen, no predictor update):
    ``predictor_recall`` (mean over sparse layers and batches, averaged over ranks) and one entry per layer."""
    from lemo_ds.predictors.calibrate import calibrate

    sums: dict[int, float] = {}
    count = 0

    def on_batch(_: int, recall: dict[int, float]) -> None:
        nonlocal count
        count += 1
        for layer, value in recall.items():
            sums[layer] = sums.get(layer, 0.0) + value

    device = next(p for p in engine.parameters()).device
    on_device = ({key: value.to(device) for key, value in batch.items()} for batch in batches)
    calibrate(engine, on_device, updates=0, on_batch=on_batch)
    layers = sorted(sums)
    values = torch.tensor([sums[layer] / max(count, 1) for layer in layers], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    per_layer = dict(zip(layers, values.tolist(), strict=True))
    record = {"predictor_recall": sum(per_layer.values()) / max(len(per_layer), 1)}
    record.update({f"predictor_recall_layer{layer}": value for layer, value in per_layer.items()})
    return record
