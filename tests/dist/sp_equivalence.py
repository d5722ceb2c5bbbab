"""Run by tests/test_sequence_parallel.py under ``deepspeed --num_gpus 2`` (two CPU ranks over gloo).

Both ranks form one Ulysses sequence-parallel group (sequence_parallel_size 2, ZeRO-3). They train one packed
row of 64 tokens (three documents, one of them across the shard boundary), fed through lemo_ds's SP data path
(DeepSpeed's UlyssesSPDataLoaderAdapter: labels shifted before sharding), and compare the group's loss and every
full (gathered) gradient with a single-process reference that every rank computes alone on the whole row:

- ``--mode dense`` (every keep ratio 1.0): the reference is the plain Hugging Face model (SP=1).
- ``--mode plain`` (no "lemo" section: Hugging Face's own loss given shift_labels): the same reference.
- ``--mode sparse`` (keep 0.5, oracle scores): the reference is an independent masked model: unmodified layers
  on every token, eliminated tokens removed as keys by the mask and their rows reset to the layer input, with
  the per-shard selection computed by its own code (each shard's blocks scored by the shard's queries, the
  global block 0 forced on the first shard, the same count on both shards).

Prints one JSON line per rank; exits non-zero on mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: masked_reference
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's lemo_ds first

from _engine import VOCAB, build, ds_config, full_grads, lemo_engine, max_grad_diff, zero_model  # noqa: E402
from masked_reference import block_scores, reference_mask  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds import sequence_parallel  # noqa: E402
from lemo_ds.selection import keep_block_count, select_blocks  # noqa: E402
from lemo_ds.training.data import IGNORE_INDEX, Row  # noqa: E402

SEQ, BLOCK, SP = 64, 8, 2
DOC_STARTS = (0, 20, 45)  # the second document crosses the shard boundary at 32
SPARSE = {"block_size": BLOCK, "keep_ratio": 0.5, "dense_layers": [0], "scorer": "oracle", "kernels": "torch"}
DENSE = {"block_size": BLOCK, "keep_ratio": 1.0}


def make_row(index: int) -> Row:
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(100 + index)).numpy()
    starts = np.zeros(SEQ, bool)
    starts[list(DOC_STARTS)] = True
    position = np.arange(SEQ) - np.maximum.accumulate(np.where(starts, np.arange(SEQ), 0))
    labels = ids.copy()
    labels[position == 0] = IGNORE_INDEX
    return Row(ids.astype(np.int64), labels.astype(np.int64), position.astype(np.int64))


def reference_loss(model, row: Row, lemo: dict | None) -> torch.Tensor:
    ids = torch.from_numpy(row.input_ids)[None]  # [1, s]
    labels = torch.from_numpy(row.labels)[None]  # [1, s]
    position = torch.from_numpy(row.position_ids)[None]  # [1, s]
    if lemo is None:
        return model(input_ids=ids, labels=labels, position_ids=position).loss
    logits = per_shard_masked_forward(model, ids, position, lemo)  # [1, s, V]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def per_shard_masked_forward(model, ids, position, lemo) -> torch.Tensor:
    """The masked reference with the per-shard selection rule, written independently of lemo_ds."""
    inner = model.model
    hidden = inner.embed_tokens(ids)  # [1, s, h]
    cos, sin = inner.rotary_emb(hidden, position)
    base = reference_mask(position, None)  # [1, 1, s, s]: causal, same document
    eye = torch.eye(SEQ, dtype=torch.bool)[None, None]
    local = SEQ // SP
    for index, layer in enumerate(inner.layers):
        if index in lemo["dense_layers"]:
            hidden = layer(hidden, attention_mask=base, position_embeddings=(cos, sin), position_ids=position)
            continue
        kept = []
        for shard in range(SP):
            rows = slice(shard * local, (shard + 1) * local)
            shard_mask = reference_mask(position[:, rows], None)  # causal, same document, within the shard
            with torch.no_grad():
                scores = block_scores(
                    "oracle", layer, hidden[:, rows].detach(), cos[:, rows], sin[:, rows], shard_mask, BLOCK
                )  # [1, n_l]
            forced = [0] if shard == 0 else []  # global block 0 lives on the first shard
            n_local = local // BLOCK
            blocks = select_blocks(scores, keep_block_count(n_local, lemo["keep_ratio"], 1, 1), forced)
            kept.append(torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, blocks, True))
        kept = torch.cat(kept, dim=1).repeat_interleave(BLOCK, dim=1)  # [1, s]
        mask = (base & kept[:, None, None, :]) | eye
        out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position)
        hidden = torch.where(kept[..., None], out, hidden)
    return model.lm_head(inner.norm(hidden))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--mode", choices=("dense", "sparse", "plain"), required=True)
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=3)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    lemo = None if args.mode == "plain" else SPARSE if args.mode == "sparse" else DENSE
    config = ds_config(args.zero_stage, lemo, sequence_parallel_size=SP)
    sequence_parallel.check_dims(sp=SP, world_size=2, seq_len=SEQ, block_size=BLOCK, heads=4, kv_heads=2)

    # Hugging Face detects packed documents from position_ids only without a cache.
    reference = build(seed=0, use_cache=False)  # plain, on every rank
    rows = [make_row(i) for i in range(4)]
    # The reference runs before SP is set up: Ulysses replaces the process-wide "sdpa" attention function.
    ref_loss = reference_loss(reference, rows[0], SPARSE if args.mode == "sparse" else None)
    ref_loss.backward()
    model = zero_model(config, reference, args.checkpointing, use_cache=False)
    state = sequence_parallel.setup(model, SP, micro_batch=1)
    engine = lemo_engine(model, config, mpu=state.mpu)

    batches = sequence_parallel.rank_batches(rows, state, micro_batch=1, device=torch.device("cpu"))
    batch = next(batches)  # row 0, this rank's half, labels shifted before sharding
    assert batch["input_ids"].shape == (1, SEQ // SP), batch["input_ids"].shape
    loss, group_loss = sequence_parallel.forward_loss(engine, batch, state)
    engine.backward(loss)
    grads = full_grads(engine)

    worst = max_grad_diff(grads, reference)
    scale = max(theirs.grad.abs().max().item() for theirs in reference.parameters())
    controller = lemo_ds.get_controller(engine.module)
    keep = controller.stats()["keep_ratio_per_layer"] if controller is not None else None
    ok = abs(group_loss.item() - ref_loss.item()) < 1e-5 and worst < 1e-5 * max(1.0, scale)
    if args.mode == "sparse":
        ok = ok and keep[0] == 1.0 and max(keep[1:]) < 0.6
    report = {"rank": rank, "mode": args.mode, "zero_stage": args.zero_stage, "loss": group_loss.item(),
              "reference_loss": ref_loss.item(), "max_grad_diff": worst, "grad_scale": scale,
              "keep_ratio_per_layer": keep, "ok": ok}  # fmt: skip
    print(json.dumps(report), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
