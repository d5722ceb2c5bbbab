"""From what a job is given (model config, DeepSpeed config, "lemo" section, flags) to the memory model's Setup."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lemo_ds.config import LemoConfig
from lemo_ds.memory.segment_loss import liger_installed
from lemo_ds.plan.memory import Setup, Shape


def job_setup(
    model_config: Any,
    ds_config: dict[str, Any],
    lemo: LemoConfig | None,
    *,
    seq_len: int,
    lora_r: int,
    world_size: int = 1,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    checkpointing: bool | None = None,
) -> tuple[Shape, Setup]:
    """The Shape and Setup of a launch/train.py job. ``checkpointing`` None: on when the DeepSpeed config has an
    "activation_checkpointing" section (launch/train.py's --grad-ckpt auto)."""
    shape = Shape.from_config(model_config)
    if checkpointing is None:
        checkpointing = "activation_checkpointing" in ds_config
    cuda = device == "cuda"
    kwargs: dict[str, Any] = dict(
        seq_len=seq_len,
        keep_ratios=tuple([1.0] * shape.layers),
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        lora_r=lora_r,
        zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        offload_params=_offloaded_params(ds_config),
        world_size=world_size,
        sp=int(ds_config.get("sequence_parallel_size", 1) or 1),
        micro_batch=_int_or(ds_config.get("train_micro_batch_size_per_gpu"), 1),
        checkpointing=checkpointing,
        device=device,
        fused_ops=False,
        segment_loss=False,
    )
    if lemo is not None:
        m = lemo.memory
        kwargs.update(
            keep_ratios=tuple(lemo.layer_keep_ratios(shape.layers)),
            block_size=lemo.block_size,
            sparse_checkpointing=m.sparse_checkpointing,
            offload_checkpoints=m.offload_checkpoints,
            pinned_buffers=m.pinned_buffers,
            resident_checkpoints=m.resident_checkpoints,
            layers_per_stored_input=m.layers_per_stored_input,
            segment_loss=m.segment_loss,
            segment_tokens=m.segment_tokens,
            liger_loss=cuda and m.segment_loss_impl != "torch" and liger_installed(),
            tiled_mlp=m.tiled_mlp,
            tiled_mlp_tokens=m.tiled_mlp_tokens,
            compact_saves=m.compact_saves,
            fused_ops=cuda and lemo.fused_ops != "off",
        )
    return shape, Setup(**kwargs)


def with_seq_len(setup: Setup, seq_len: int) -> Setup:
    return dataclasses.replace(setup, seq_len=seq_len)


def _offloaded_params(ds_config: dict[str, Any]) -> str | None:
    """ZeRO-3's parameter offload target ("cpu", "nvme") or None."""
    zero = ds_config.get("zero_optimization", {})
    device = (zero.get("offload_param") or {}).get("device") if int(zero.get("stage", 0)) == 3 else None
    return device if device in ("cpu", "nvme") else None


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) else default
