"""Run by tests/test_zero3.py under ``deepspeed --num_gpus 2`` (two CPU ranks over gloo).

Each rank builds the same tiny Llama under deepspeed.zero.Init, converts it with lemo_ds.initialize (keep 0.4,
oracle scorer), runs forward and backward on its own batch, and checks against a plain single-process
reference that every rank computes alone: the same model without ZeRO, the same conversion, both ranks'
batches and their averaged gradient. The loss and every full (gathered) gradient must match. Prints one JSON
line per rank; exits non-zero on mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM, LlamaConfig

import lemo_ds

LEMO = {"block_size": 8, "keep_ratio": 0.4, "dense_layers": [0], "scorer": "oracle"}
SEQ, VOCAB = 40, 64
MEMORY_OFF = {"segment_loss": False, "sparse_checkpointing": False, "tiled_mlp": False, "compact_saves": False}
# --all-memory: every memory feature on the ZeRO-3 model; the reference runs with none of them.
MEMORY_ALL = {"segment_loss": True, "segment_tokens": 16, "sparse_checkpointing": True, "tiled_mlp": True,
              "tiled_mlp_tokens": 16, "compact_saves": True, "offload_checkpoints": True}


def build(seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def batch_of(rank: int):
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    return ids


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--all-memory", action="store_true")
    args = parser.parse_args()
    lemo = {**LEMO, "memory": MEMORY_ALL} if args.all_memory else LEMO
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "lemo": lemo,
    }

    reference = build(seed=0)  # plain, on every rank
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build(seed=0)
    # zero.Init draws its initial values in its own order: start both models from the same weights.
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([ours], modifier_rank=0), torch.no_grad():
            ours.copy_(theirs)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = lemo_ds.initialize(model=model, optimizer=optimizer, config=ds_config)

    ids = batch_of(rank)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    full_grads = [safe_get_full_grad(param) for param in engine.module.parameters()]

    lemo_ds.apply_lemo(reference, {**LEMO, "memory": MEMORY_OFF} if args.all_memory else LEMO)
    losses = []
    for other in range(world):
        other_ids = batch_of(other)
        other_loss = reference(input_ids=other_ids, labels=other_ids).loss / world
        other_loss.backward()
        losses.append(other_loss.item() * world)
    worst = max((ours - theirs.grad).abs().max().item() for ours, theirs in zip(full_grads, reference.parameters()))
    stats = lemo_ds.get_controller(engine.module).stats()
    ok = abs(loss.item() - losses[rank]) < 1e-5 and worst < 1e-5 and stats["mean_keep_ratio"] < 1.0
    print(
        json.dumps(
            {
                "rank": rank,
                "loss": loss.item(),
                "reference_loss": losses[rank],
                "max_grad_diff": worst,
                "keep_ratio_per_layer": stats["keep_ratio_per_layer"],
                "ok": ok,
            }
        ),
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
