"""Predictors files: safetensors tensors plus one JSON metadata entry.

Tensors are named ``layers.<decoder layer index>.<parameter>`` (fp32). The metadata key ``lemo_ds_predictors``
holds JSON: ``format`` (this module's version), ``fingerprint`` (see fingerprint.py), ``design`` (ranks before
pruning), ``layers`` (per layer: ReLU units kept on the q and k sides after elastic pruning, parameters),
``prior_layers`` (layers to score with the positional prior, which recalled more than their predictor) and whatever
the writer adds under ``info`` (recall table, keep ratio, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lemo_ds.atomic_io import write_atomically
from lemo_ds.errors import LemoConfigError
from lemo_ds.predictors.fingerprint import FINGERPRINT_KEYS
from lemo_ds.predictors.module import LayerPredictor, PredictorBank, PredictorDesign

METADATA_KEY = "lemo_ds_predictors"
FORMAT = 1


def save_predictors(
    path: str | os.PathLike,
    bank: PredictorBank,
    fingerprint: dict[str, Any],
    info: dict[str, Any] | None = None,
    prior_layers: list[int] | None = None,
) -> dict[str, Any]:
    """Write ``bank`` to ``path`` (atomically); returns the metadata written. ``prior_layers``: layers whose
    predictor recalled less than the positional prior on held-out data (the scorer scores them with the prior)."""
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    for index in bank.layers:
        predictor = bank.get(index)
        hidden_q, hidden_k = predictor.hidden_units
        layers[str(index)] = {"hidden_q": hidden_q, "hidden_k": hidden_k, "parameters": predictor.parameter_count()}
        for name, param in predictor.named_parameters():
            tensors[f"layers.{index}.{name}"] = param.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "design": bank.design.to_dict(),
        "hidden_size": bank.hidden_size,
        "layers": layers,
        "prior_layers": sorted(prior_layers or []),
        "info": info or {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # atomic: a job stopped mid-write (or a full disk) leaves the previous file, never half of one
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a predictors file (LemoConfigError when it is not one)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LemoConfigError(
            f"lemo.predictor_path: {path}: no such file; give a file written by launch/train_predictor.py, or "
            "leave it out to calibrate predictors at the start of training"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise LemoConfigError(f"lemo.predictor_path: {path} is not a safetensors file ({error})") from None
    if raw is None:
        raise LemoConfigError(f"lemo.predictor_path: {path} holds no lemo_ds predictors (no '{METADATA_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or not all(key in meta.get("fingerprint", {}) for key in FINGERPRINT_KEYS):
        raise LemoConfigError(f"lemo.predictor_path: {path} has predictors format {meta.get('format')!r}; this "
                              f"version of lemo_ds reads format {FORMAT}")  # fmt: skip
    return meta


def load_predictors(path: str | os.PathLike) -> tuple[PredictorBank, dict[str, Any]]:
    """(bank on the CPU, metadata) from a predictors file. The caller checks the fingerprint against its model."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    tensors = load_file(os.fspath(path))
    design = PredictorDesign(**meta["design"])
    bank = PredictorBank(meta["hidden_size"], design)
    for key, sizes in meta["layers"].items():
        predictor = LayerPredictor(meta["hidden_size"], design, sizes["hidden_q"], sizes["hidden_k"])
        predictor.load_state_dict({name: tensors[f"layers.{key}.{name}"] for name, _ in predictor.named_parameters()})
        bank.set(int(key), predictor)
    return bank, meta
