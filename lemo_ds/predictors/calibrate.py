"""Calibration: train a converted model's predictors on oracle labels from a few batches, the model frozen.

Every sparse layer's input (of the dense model: see layer_inputs.py) gets the oracle's labels from the layer's own
queries and keys, and that layer's predictor trains on them (``PredictorScorer.observe``). Each batch is seen once,
and a layer's recall is measured on each batch before the predictor trains on it, so the recall of the last batch
is a held-out figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lemo_ds.errors import LemoConfigError
from lemo_ds.predictors.layer_inputs import for_each_layer_input
from lemo_ds.predictors.scorer import PredictorScorer, bound_predictor_scorer
from lemo_ds.score_context import ScoreContext


def predictor_scorer_of(model: nn.Module) -> PredictorScorer:
    """The bound predictor scorer of a converted model (LemoConfigError if it has none)."""
    scorer = bound_predictor_scorer(model)
    if scorer is None:
        raise LemoConfigError('the model has no predictor scorer; convert it with lemo scorer "predictor"')
    return scorer


def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    updates: int | None = None,
    on_batch: Callable[[int, dict[int, float]], None] | None = None,
) -> dict[int, float]:
    """Train the predictors of ``model`` (converted with ``scorer: "predictor"``) on ``batches``.

    model: the converted model, or a DeepSpeed engine / peft model around it; every rank of a data-parallel job
        calls this with its own batches (the same number on every rank: the gradients are averaged).
    batches: model inputs (``input_ids``, ``position_ids`` ...) on the model's device; ``labels`` are ignored.
    updates: optimizer steps per layer per batch (default: the config's ``predictor.calibration_updates``; 0
        measures recall without training).
    on_batch: called after each batch with (batch number from 1, {layer: recall on it before training}).

    Returns {sparse layer: recall} of the last batch, measured before training on it.
    """
    scorer = predictor_scorer_of(model)
    updates = scorer.settings.calibration_updates if updates is None else updates
    recall: dict[int, float] = {}

    def observe(layer: nn.Module, hidden: torch.Tensor, context: ScoreContext) -> None:
        _, observation = scorer.observe(layer, hidden, context, updates)
        recall[context.layer_index] = observation.recall

    def after_batch(number: int) -> None:
        if on_batch is not None:
            on_batch(number, dict(sorted(recall.items())))

    layers = scorer.trainer.sparse_layers
    for_each_layer_input(model, batches, layers, scorer.config.block_size, observe, after_batch)
    return dict(sorted(recall.items()))
