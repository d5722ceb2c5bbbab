"""The training job's parallel layout (torchtitan's ParallelDims) and sequence parallelism, in one place.

``sequence_parallel_size`` is DeepSpeed's own config key (absent or 1: plain data parallelism). With sp > 1 the
world is dp x sp (consecutive ranks form an SP group, DeepSpeed's ``parallel_state_sp``), every SP group trains
one micro-batch at a time, sharded along the sequence (lemo_ds.sequence_parallel), and a step consumes
``dp x micro_batch x grad_accum`` rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lemo_ds import sequence_parallel
from lemo_ds.config import LemoConfig
from lemo_ds.errors import LemoConfigError
from lemo_ds.training import data, flags
from lemo_ds.training.errors import TrainingSetupError


@dataclass(frozen=True)
class ParallelDims:
    """How the job's ranks divide the work, validated before any collective."""

    world_size: int
    sp: int  # ranks of a sequence-parallel group (1: none)
    micro_batch: int  # rows a data-parallel group packs into one micro-batch
    grad_accum: int  # micro-batches per optimizer step

    @property
    def dp(self) -> int:
        """Data-parallel groups: an SP group shares its rows."""
        return self.world_size // self.sp

    @property
    def rows_per_step(self) -> int:
        """Global rows of the packed data stream one optimizer step consumes."""
        return self.dp * self.micro_batch * self.grad_accum


def parallel_dims(
    ds_config: dict[str, Any], *, world_size: int, seq_len: int, lemo: LemoConfig | None, model_config: Any
) -> ParallelDims:
    """The job's ParallelDims from the DeepSpeed config and the world size of the launch, before any collective
    (every rank reaches the same verdict): a bad combination of world size, sequence length, block size and head
    counts is a TrainingSetupError naming the fix."""
    dims = ParallelDims(
        world_size=world_size,
        sp=sequence_parallel.sp_size_from_config(ds_config),
        micro_batch=flags.micro_batch_size(ds_config),
        grad_accum=int(ds_config.get("gradient_accumulation_steps", 1)),
    )
    if dims.sp == 1:
        return dims
    text = model_config.get_text_config()
    try:
        sequence_parallel.check_dims(
            sp=dims.sp,
            world_size=world_size,
            seq_len=seq_len,
            block_size=lemo.block_size if lemo is not None else None,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
        )
        sequence_parallel.check_zero_config(ds_config, dims.sp)
    except ValueError as error:
        raise TrainingSetupError(f"--seq-len {seq_len}, {world_size} ranks: {error}") from None
    try:
        sequence_parallel.check_loss_tokens(lemo, dims.sp)
    except LemoConfigError as error:
        raise TrainingSetupError(str(error)) from None
    if lemo is not None and lemo.scorer == "predictor" and lemo.predictor_path is None:
        raise TrainingSetupError(
            'sequence parallelism with lemo scorer "predictor" needs a trained predictors file (--predictor FILE, '
            "from launch/train_predictor.py): calibration before training runs on whole rows, not on shards"
        )
    return dims


def setup(dims: ParallelDims, net: nn.Module) -> Any:
    """After the model (and LoRA) is built, before lemo_ds.initialize: Ulysses attention and the SP groups. Returns
    the SP state (its ``mpu`` goes to deepspeed.initialize), None without SP."""
    return sequence_parallel.setup(net, dims.sp, dims.micro_batch) if dims.sp > 1 else None


def rank_batches(
    rows: Iterable, dims: ParallelDims, sp: Any, rank: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches: whole rows (data parallel) or shards of its SP group's rows."""
    if sp is None:
        return data.rank_batches(rows, rank=rank, world_size=dims.world_size, micro_batch=dims.micro_batch)
    return sequence_parallel.rank_batches(rows, sp, dims.micro_batch, device)


def forward_loss(engine: nn.Module, batch: dict[str, torch.Tensor], sp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, loss to report): the SP group's token-weighted mean under SP."""
    if sp is None:
        loss = engine(**batch).loss
        return loss, loss.detach()
    return sequence_parallel.forward_loss(engine, batch, sp)
