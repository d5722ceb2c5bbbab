"""Training precision from the DeepSpeed config, with ``"bf16": {"enabled": "auto"}`` resolved.

DeepSpeed itself drops every ``"auto"`` value of its config (a convention for Hugging Face's Trainer, which
fills them in), so ``"enabled": "auto"`` would silently mean fp32 there. The training job resolves it
instead: bf16 where the accelerator computes in bf16 (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX,
as oneDNN reports it), fp32 elsewhere. ``"enabled": true`` on a CPU without bf16 support also falls back
to fp32 (bf16 would be emulated there, many times slower), with one line of log saying so.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def bf16_supported(device_type: str) -> bool:
    """Whether the accelerator computes natively in bf16."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True  # other accelerators: trust the config


def resolve_precision(ds_config: dict[str, Any], device_type: str) -> tuple[dict[str, Any], torch.dtype, str | None]:
    """(config with bf16.enabled a bool, the dtype to build the model in, a note for the log or None)."""
    config = copy.deepcopy(ds_config)
    section = config.get("bf16", config.get("bfloat16"))
    fp16 = config.get("fp16", {}).get("enabled") is True
    if not isinstance(section, dict) or section.get("enabled") in (None, False):
        return config, (torch.float16 if fp16 else torch.float32), None
    key = "bf16" if "bf16" in config else "bfloat16"
    requested = section.get("enabled")
    supported = bf16_supported(device_type)
    note = None
    if requested == "auto":
        enabled = supported and not fp16
        note = f'bf16 "auto" -> {"bf16" if enabled else "fp32"} on {device_type}'
    else:
        enabled = bool(requested)
        if enabled and not supported and device_type == "cpu":
            enabled = False
            note = "bf16 requested but this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32"
    config[key] = {**section, "enabled": enabled}
    dtype = torch.bfloat16 if enabled else (torch.float16 if fp16 else torch.float32)
    return config, dtype, note


def without_bf16(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The config with bf16 turned off (under whichever of its two keys it has)."""
    config = copy.deepcopy(ds_config)
    for key in ("bf16", "bfloat16"):
        if isinstance(config.get(key), dict):
            config[key]["enabled"] = False
    return config
