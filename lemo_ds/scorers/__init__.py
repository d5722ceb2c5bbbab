"""Block scorers: how a sparse layer ranks its blocks. ``build_scorer`` makes the one the config names."""

from __future__ import annotations

from lemo_ds.config import LemoConfig
from lemo_ds.errors import LemoConfigError
from lemo_ds.predictors.scorer import PredictorScorer
from lemo_ds.scorers.base import BlockScorer, ScoreContext
from lemo_ds.scorers.norm import NormScorer
from lemo_ds.scorers.oracle import OracleScorer
from lemo_ds.scorers.random import RandomScorer


def build_scorer(config: LemoConfig) -> BlockScorer:
    if config.scorer == "oracle":
        return OracleScorer(config.oracle_chunk_tokens, config.kernels)
    if config.scorer == "random":
        return RandomScorer(config.seed)
    if config.scorer == "norm":
        return NormScorer()
    if config.scorer == "predictor":
        # Loads and checks predictor_path, if any; the oracle scores the layers it cannot yet.
        return PredictorScorer(config, OracleScorer(config.oracle_chunk_tokens, config.kernels))
    raise LemoConfigError(f'lemo.scorer: unknown scorer "{config.scorer}"; use oracle, random, norm or predictor')


__all__ = [
    "BlockScorer",
    "NormScorer",
    "OracleScorer",
    "PredictorScorer",
    "RandomScorer",
    "ScoreContext",
    "build_scorer",
]
