"""lemo_ds: contextual token sparsity (LeMo) for long-context fine-tuning with DeepSpeed.

    import lemo_ds
    engine, optimizer, _, scheduler = lemo_ds.initialize(model=model, model_parameters=params,
                                                         config="ds_configs/zero3_lemo.json")

or, without DeepSpeed, ``lemo_ds.apply_lemo(model, {"keep_ratio": 0.4})``.
"""

from lemo_ds.config import LemoConfig, parse_lemo_config, split_ds_config
from lemo_ds.engine import initialize
from lemo_ds.errors import LemoConfigError, LemoError, LemoInputError, UnsupportedModelError
from lemo_ds.inject import (
    apply_lemo,
    disable_document_attention,
    enable_document_attention,
    get_controller,
    remove_lemo,
)
from lemo_ds.policies import DecoderLayerPolicy, register_policy, supported_model_types

__version__ = "0.1.0"

__all__ = [
    "DecoderLayerPolicy",
    "LemoConfig",
    "LemoConfigError",
    "LemoError",
    "LemoInputError",
    "UnsupportedModelError",
    "apply_lemo",
    "disable_document_attention",
    "enable_document_attention",
    "get_controller",
    "initialize",
    "parse_lemo_config",
    "register_policy",
    "remove_lemo",
    "split_ds_config",
    "supported_model_types",
]
