"""Which model ``--model`` names, and building it (under ZeRO-3 partitioning when the config asks for it).

``--model`` is a Hugging Face model directory (``config.json`` + weights + tokenizer, local files only) or
a preset name (``lemo_ds.training.presets``, random init). Under ZeRO-3 a
``transformers.integrations.HfDeepSpeedConfig`` object must be alive while the model is built: transformers
5.x then builds it inside ``deepspeed.zero.Init`` (``from_pretrained`` and ``from_config`` alike), so each
rank only ever holds its partition of the weights. The caller keeps the returned handle for the whole run.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.presets import PRESETS, preset_config

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class ModelSource:
    name: str  # what --model said
    kind: str  # "preset" or "dir"
    config: Any  # transformers PretrainedConfig


def resolve_model(model: str) -> ModelSource:
    """The config of ``--model`` (no weights loaded yet); a clear error when it is neither kind."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise TrainingSetupError(
                f"--model {model}: the directory has no config.json; give a Hugging Face model directory "
                f"(saved with save_pretrained) or a preset: {', '.join(PRESETS)}"
            )
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise TrainingSetupError(f"--model {model}: cannot read its config.json ({error})") from None
        return ModelSource(model, "dir", config)
    if model in PRESETS:
        return ModelSource(model, "preset", preset_config(model))
    raise TrainingSetupError(
        f"--model {model}: neither a model directory nor a preset; give a local Hugging Face model directory "
        f"or one of: {', '.join(PRESETS)}"
    )


def zero3_context(ds_config: dict[str, Any]):
    """An ``HfDeepSpeedConfig`` when the config is ZeRO-3 (keep it alive while building), else None."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def build_model(source: ModelSource, dtype: torch.dtype, seed: int) -> nn.Module:
    """The causal LM of ``source`` with SDPA attention, in ``dtype``, in training mode.

    Call with the ``zero3_context`` handle alive. Every rank seeds identically so that random init (and,
    later, LoRA init) agree across ranks.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if source.kind == "dir":
        model = AutoModelForCausalLM.from_pretrained(
            source.name, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    else:
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False  # training never reads a KV cache
    return model.train()


def add_lora(model: nn.Module, rank: int, seed: int, dtype: torch.dtype | None = None) -> nn.Module:
    """peft LoRA of rank ``rank`` on the attention projections (alpha = 2 * rank, no dropout).

    ``dtype`` None: peft's adapters (float32 beside a bf16/fp16 model: the Trainer's autocast multiplies them in
    bf16). A dtype: the adapters in it, as DeepSpeed's mixed precision holds every parameter (its optimizer keeps the
    float32 master copies). DeepSpeed casts the adapters itself under ZeRO-0/1/2, but not under ZeRO-3 once the
    model was built in ``zero.Init``: they would stay float32, and every adapter call would copy its [s, h] input to
    float32 and multiply in float32."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: a FutureWarning per rank about peft's
        # code, nothing the user can act on (the property still answers correctly).
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, config)
    if dtype is not None:
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, with ZeRO-3 partitioned parameters counted in full."""
    total = trainable = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return total, trainable
