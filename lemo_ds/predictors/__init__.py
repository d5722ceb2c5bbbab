"""Learned predictors of block informativeness (LeMo's pattern prediction), one small model per sparse layer.

- ``module``: the predictor (per-token ReLU units, block max/mean pooling, low-rank q^ and k^, softplus tiles with
  a learned distance bias, causal column sums) and the bank of them
- ``labels``: oracle labels of a layer input (scores, block-pair tiles, the reach of each query block)
- ``loss``: tile regression plus a ranking term
- ``recall``: top-k recall against the oracle under the contract's selection rule
- ``trainer``: streaming training, a few steps per observed batch, gradients averaged over data-parallel ranks; the
  positional prior each predictor must beat
- ``layer_inputs``: a frozen model's forward over batches, every sparse layer's input handed to a callback
- ``scorer``: the scorer that uses them (``scorer: "predictor"``): predicts in the forward, trains in the model
  controller's step hook, writes and restores its whole state in a training checkpoint
- ``calibrate``: training a converted model's predictors from a few batches, the model frozen
- ``job``: what launch/train.py does with them (calibration before training, refresh metrics)
- ``prune``: elastic pruning of ReLU units that are almost never active
- ``fingerprint`` / ``io``: the model a predictors file fits; safetensors files with JSON metadata
"""

from lemo_ds.predictors.calibrate import calibrate
from lemo_ds.predictors.fingerprint import check_fingerprint, model_fingerprint
from lemo_ds.predictors.io import load_predictors, read_metadata, save_predictors
from lemo_ds.predictors.labels import OracleLabels, oracle_labels
from lemo_ds.predictors.module import LayerPredictor, PredictorBank, PredictorDesign
from lemo_ds.predictors.recall import topk_recall
from lemo_ds.predictors.scorer import PredictorScorer, find_predictor_scorer
from lemo_ds.predictors.trainer import PredictorTrainer, SelectionRule

__all__ = [
    "LayerPredictor",
    "OracleLabels",
    "PredictorBank",
    "PredictorDesign",
    "PredictorScorer",
    "PredictorTrainer",
    "SelectionRule",
    "calibrate",
    "check_fingerprint",
    "find_predictor_scorer",
    "load_predictors",
    "model_fingerprint",
    "oracle_labels",
    "read_metadata",
    "save_predictors",
    "topk_recall",
]
