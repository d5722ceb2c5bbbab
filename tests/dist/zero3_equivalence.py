"""Run by tests/test_zero3.py under ``deepspeed --num_gpus 2`` (two CPU ranks over gloo).

Each rank builds the same tiny Llama under deepspeed.zero.Init, converts it with lemo_ds.initialize (keep 0.4,
oracle scorer), runs forward and backward on its own batch, and checks against a plain single-process
reference that every rank computes alone: the same model without ZeRO, the same conversion, both ranks'
batches and their averaged gradient. The loss and every full (gathered) gradient must match. Prints one JSON
line per rank; exits non-zero on mismatch.
"""

from __future__ import annotations

import argparse
import sys

import deepspeed
import torch
from _engine import VOCAB, build, ds_config, full_grads, leave, lemo_engine, max_grad_diff, write_report, zero_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_RULE
from lemo_ds.memory import segment_loss

# LeMo's rule (the loss on every token): the reference runs without the segment loss.
LEMO = {**LEMO_ARTIFACT_RULE, "block_size": 8, "keep_ratio": 0.4, "dense_layers": [0]}
SEQ = 40
MEMORY_OFF = {"segment_loss": False, "sparse_checkpointing": False, "tiled_mlp": False, "compact_saves": False}
# --all-memory: every memory feature and the fused ops (Triton RMSNorm/RoPE/SwiGLU, Liger's fused linear
# cross-entropy as the partitioned LM head's forward) on the ZeRO-3 model; the reference runs with none of them.
# Liger's loss where Triton's interpreter runs it (3.7 on), lemo_ds's segmented torch loss below that.
LIGER_LOSS = "liger" if segment_loss.liger_usable(torch.zeros(1)) else "torch"
MEMORY_ALL = {"segment_loss": True, "segment_tokens": 16, "sparse_checkpointing": True, "tiled_mlp": True,
              "tiled_mlp_tokens": 16, "compact_saves": True, "offload_checkpoints": True,
              "segment_loss_impl": LIGER_LOSS}


def batch_of(rank: int):
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    return ids


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--all-memory", action="store_true")
    parser.add_argument("--eliminate", default="layer", choices=("layer", "attention"))
    args = parser.parse_args()
    lemo = {**LEMO, "fused_ops": "on", "memory": MEMORY_ALL} if args.all_memory else LEMO
    lemo = {**lemo, "eliminate": args.eliminate}
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = ds_config(lemo=lemo)

    reference = build(seed=0)  # plain, on every rank
    engine = lemo_engine(zero_model(config, reference, args.checkpointing), config)

    ids = batch_of(rank)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    grads = full_grads(engine)

    reference_section = {**LEMO, "fused_ops": "off", "memory": MEMORY_OFF} if args.all_memory else LEMO
    lemo_ds.apply_lemo(reference, {**reference_section, "eliminate": args.eliminate})
    losses = []
    for other in range(world):
        other_ids = batch_of(other)
        other_loss = reference(input_ids=other_ids, labels=other_ids).loss / world
        other_loss.backward()
        losses.append(other_loss.item() * world)
    worst = max_grad_diff(grads, reference)
    stats = lemo_ds.get_controller(engine.module).stats()
    ok = abs(loss.item() - losses[rank]) < 1e-5 and worst < 1e-5 and stats["mean_keep_ratio"] < 1.0
    write_report(
        {
            "rank": rank,
            "loss": loss.item(),
            "reference_loss": losses[rank],
            "max_grad_diff": worst,
            "keep_ratio_per_layer": stats["keep_ratio_per_layer"],
            "ok": ok,
        }
    )
    return 0 if ok else 1


if __name__ == "__main__":
    leave(main())
