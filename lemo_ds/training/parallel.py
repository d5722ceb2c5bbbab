"""Sequence parallelism in the training job: what launch/train.py calls, in one place.

``sequence_parallel_size`` is DeepSpeed's own config key (absent or 1: plain data parallelism). With sp > 1 the
world is dp x sp (consecutive ranks form an SP group, DeepSpeed's ``parallel_state_sp``), every SP group trains
one micro-batch at a time, sharded along the sequence (lemo_ds.sequence_parallel), and a step consumes
``dp x micro_batch x grad_accum`` rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lemo_ds import sequence_parallel
from lemo_ds.training import data
from lemo_ds.training.errors import TrainingSetupError


def check(run: Any, args: Any, ds_config: dict[str, Any]) -> None:
    """Before any collective (every rank reaches the same verdict): sets ``run.sp_size``; a bad combination of
    world size, sequence length, block size and head counts is a TrainingSetupError naming the fix."""
    run.sp_size = sequence_parallel.sp_size_from_config(ds_config)
    if run.sp_size == 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    text = run.source.config.get_text_config()
    try:
        sequence_parallel.check_dims(
            sp=run.sp_size,
            world_size=world,
            seq_len=args.seq_len,
            block_size=run.lemo.block_size if run.lemo is not None else None,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        )
        sequence_parallel.check_zero_config(ds_config, run.sp_size)
    except ValueError as error:
        raise TrainingSetupError(f"--seq-len {args.seq_len}, {world} ranks: {error}") from None
    if run.lemo is not None and run.lemo.loss_tokens == "processed":
        # Each shard would divide by its own count of processed positions: a mean of means, not the group's mean.
        raise TrainingSetupError(
            'lemo loss_tokens "processed" is not supported with sequence parallelism yet; use loss_tokens "all" '
            "or sequence_parallel_size 1"
        )
    if run.lemo is not None and run.lemo.scorer == "predictor" and run.lemo.predictor_path is None:
        raise TrainingSetupError(
            'sequence parallelism with lemo scorer "predictor" needs a trained predictors file (--predictor FILE, '
            "from launch/train_predictor.py): calibration before training runs on whole rows, not on shards"
        )


def setup(run: Any, net: nn.Module) -> Any:
    """After the model (and LoRA) is built, before lemo_ds.initialize: Ulysses attention and the SP groups.
    Returns the ``mpu`` to give deepspeed.initialize (None without SP)."""
    run.sp = sequence_parallel.setup(net, run.sp_size, run.micro_batch) if run.sp_size > 1 else None
    run.dp_size = run.world_size // run.sp_size
    return run.sp.mpu if run.sp is not None else None


def rank_batches(run: Any, rows: Iterable, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches: whole rows (data parallel) or shards of its SP group's rows."""
    if run.sp is None:
        return data.rank_batches(rows, rank=run.rank, world_size=run.world_size, micro_batch=run.micro_batch)
    return sequence_parallel.rank_batches(rows, run.sp, run.micro_batch, device)


def forward_loss(run: Any, engine: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, loss to report): the SP group's token-weighted mean under SP."""
    if run.sp is None:
        loss = engine(**batch).loss
        return loss, loss.detach()
    return sequence_parallel.forward_loss(engine, batch, run.sp)
