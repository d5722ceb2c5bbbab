"""The benchmark harness's lemo-predictor variants: calibrated on the fly on the first step, kept across the
variant switches of the measurement rounds (CPU, the tiny-llama shape)."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace

import torch
from launch_util import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness.measure import TrainingStep  # noqa: E402
from benchmarks.harness.model import build_model, random_batch  # noqa: E402
from benchmarks.harness.shapes import get_shape  # noqa: E402
from benchmarks.harness.variants import deactivate, get_variant  # noqa: E402
from lemo_ds.predictors import read_metadata  # noqa: E402
from lemo_ds.predictors.scorer import find_predictor_scorer  # noqa: E402


def test_predictor_variant_calibrates_once_then_loads_its_predictors():
    bench = build_model(get_shape("tiny-llama"), 256, torch.device("cpu"), torch.float32)
    step = TrainingStep(bench, random_batch(bench.shape.vocab, 256, torch.device("cpu")), chunked_impl="torch")
    # PyTorch kernels: conftest turns Triton's CPU interpreter on for the kernel tests, which would only slow this
    # down (the kernels have their own tests).
    predictor, other = (replace(get_variant(name), lemo={**get_variant(name).lemo, "kernels": "torch"})
                        for name in ("lemo-predictor+ckpt", "lemo-norm+ckpt"))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-the-fly calibration says so once
        step(predictor)  # the warm-up: oracle selection, one calibration batch per sparse layer
    scorer = find_predictor_scorer(bench.model)
    sparse = scorer.trainer.sparse_layers
    assert sparse and scorer.trained == set(sparse)
    assert all(len(scorer.trainer.history[i]) == 1 for i in sparse)
    step(other)  # a measurement round switches variants: the predictors go to a file
    path = bench.info["predictor_files"][predictor.name]
    assert read_metadata(path)["info"]["calibrated"].startswith("on the fly")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to calibrate: no warning
        outcome = step(predictor)
    reloaded = find_predictor_scorer(bench.model)
    assert reloaded is not scorer and reloaded.config.predictor_path == path
    assert reloaded.trained == set(sparse) and not reloaded.trainer.history  # scored, not trained
    assert outcome.keep_ratio_per_layer[sparse[0]] < 1.0
    deactivate(bench)
