"""The model fingerprint a predictors file records: predictors fit one architecture and one block size."""

from __future__ import annotations

from typing import Any

from lemo_ds.errors import LemoConfigError

FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "block_size",
)


def model_fingerprint(model_config: Any, block_size: int) -> dict[str, Any]:
    """(family, layers, hidden size, heads, KV heads, block size) of a Hugging Face config."""
    heads = model_config.num_attention_heads
    return {
        "model_type": model_config.model_type,
        "num_hidden_layers": int(model_config.num_hidden_layers),
        "hidden_size": int(model_config.hidden_size),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(getattr(model_config, "num_key_value_heads", None) or heads),
        "block_size": int(block_size),
    }


def check_fingerprint(recorded: dict[str, Any], actual: dict[str, Any], source: str) -> None:
    """LemoConfigError naming every field that differs, when predictors trained for ``recorded`` meet ``actual``."""
    differ = [f"{key} {recorded.get(key)!r} (file) vs {actual[key]!r} (model)" for key in FINGERPRINT_KEYS
              if recorded.get(key) != actual[key]]  # fmt: skip
    if differ:
        raise LemoConfigError(
            f"predictors file {source} was trained for another model: {'; '.join(differ)}. Train predictors for "
            "this model (launch/train_predictor.py), or leave lemo.predictor_path out to calibrate them at the start "
            "of training"
        )
