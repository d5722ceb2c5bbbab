"""What launch/train.py does with predictors: calibrate them before training, report the online refresh."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lemo_ds.config import LemoConfig
from lemo_ds.predictors.calibrate import calibrate
from lemo_ds.predictors.scorer import find_predictor_scorer


def calibrate_before_training(
    engine: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    config: LemoConfig | None,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[int, float] | None:
    """With ``scorer: "predictor"`` and no ``predictor_path``: train the predictors on the first
    ``predictor.calibration_batches`` micro-batches of ``batches`` (model frozen, oracle labels) and log the recall
    per layer; otherwise (also when every predictor is trained already: restored from a checkpoint) do nothing.
    Returns {layer: recall on the last batch, before training on it} or None."""
    if config is None or config.scorer != "predictor" or config.predictor_path is not None:
        return None
    count = config.predictor.calibration_batches
    scorer = find_predictor_scorer(engine)  # None: no sparse layer (every keep ratio 1.0), nothing to calibrate
    if count == 0 or scorer is None or scorer.all_trained:
        return None
    started = time.perf_counter()
    chosen = ({key: value.to(device) for key, value in batch.items()} for batch in itertools.islice(batches, count))
    recall = calibrate(engine, chosen)
    table = ", ".join(f"layer {layer} {value:.3f}" for layer, value in recall.items())
    mean = sum(recall.values()) / max(len(recall), 1)
    log(f"predictors: calibrated on {count} micro-batches in {time.perf_counter() - started:.1f} s (model frozen, "
        f"oracle labels); top-k recall on the last one, before training on it: {table}; mean {mean:.3f}")  # fmt: skip
    return recall


def refresh_record(engine: nn.Module) -> dict[str, float]:
    """Metrics of the online refreshes since the last call: ``predictor_recall`` (mean over layers) and
    ``predictor_recall_layer<i>``; empty when none happened (or the model has no predictor scorer). Every rank
    calls it at the same point of its loop: the refresh of the step just taken trains here, if no forward since
    has (``PredictorScorer.pop_refresh_log``)."""
    scorer = find_predictor_scorer(engine)
    entries = scorer.pop_refresh_log() if scorer is not None else []
    if not entries:
        return {}
    per_layer = {int(entry["layer"]): entry["recall"] for entry in entries}  # the latest refresh of each layer
    record = {"predictor_recall": sum(per_layer.values()) / len(per_layer)}
    record.update({f"predictor_recall_layer{layer}": value for layer, value in sorted(per_layer.items())})
    return record
