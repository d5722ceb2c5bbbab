"""Run by tests/test_sequence_parallel.py under ``deepspeed --num_gpus 2`` (or 4 with ``--dp 2``: CPU ranks
over gloo).

Consecutive pairs of ranks form Ulysses sequence-parallel groups (sequence_parallel_size 2; ``--dp`` groups,
ZeRO-3 or ZeRO-2 over all ranks). Data-parallel rank ``g`` (SP group ``g``) trains packed row ``g`` of 64 tokens
(three documents, one of them across the shard boundary; each row's tokens are different), fed through
lemo_ds.training.parallel, what launch/train.py calls (DeepSpeed's UlyssesSPDataLoaderAdapter: labels shifted
before sharding). Each rank compares its group's loss with a single-process reference on row ``g``, and every
full (gathered) gradient with the reference's gradient of the mean of the ``--dp`` rows' losses (DeepSpeed
averages the gradients over the data-parallel groups); every rank computes the references alone:

- ``--mode dense`` (every keep ratio 1.0): the reference is the plain Hugging Face model (SP=1).
- ``--mode plain`` (no "lemo" section: Hugging Face's own loss given shift_labels): the same reference.
- ``--mode sparse`` (keep 0.5, oracle scores): the reference is an independent masked model: unmodified layers
  on every token, eliminated tokens removed as keys by the mask and their rows reset to the layer input, with
  the per-shard selection computed by its own code (each shard's blocks scored by the shard's queries, the
  global block 0 forced on the first shard, the same count on both shards).

Each rank also checks that its shards of the first two micro-steps are its SP rank's halves of rows ``g`` and
``dp + g`` (the row stream dealt out over the data-parallel groups). Prints one JSON line per rank; exits
non-zero on mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: masked_reference
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's lemo_ds first

from _engine import VOCAB, build, ds_config, full_grads, leave, lemo_engine, max_grad_diff, write_report, zero_model  # noqa: E402
from masked_reference import block_scores, reference_mask  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds import sequence_parallel  # noqa: E402
from lemo_ds.config import LEMO_ARTIFACT_RULE  # noqa: E402
from lemo_ds.core.selection import keep_block_count, select_blocks  # noqa: E402
from lemo_ds.training import parallel  # noqa: E402
from lemo_ds.training.data import IGNORE_INDEX, Row  # noqa: E402

SEQ, BLOCK, SP = 64, 8, 2
DOC_STARTS = (0, 20, 45)  # the second document crosses the shard boundary at 32
# LeMo's rule, which the per-shard reference implements (the processed loss is refused under sequence parallelism).
SPARSE = {**LEMO_ARTIFACT_RULE, "block_size": BLOCK, "keep_ratio": 0.5, "dense_layers": [0], "kernels": "torch"}
DENSE = {"block_size": BLOCK, "keep_ratio": 1.0, "loss_tokens": "all"}


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
        if lemo.get("eliminate") == "attention":  # the attention term on kept rows only; every row's MLP
            attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                           position_embeddings=(cos, sin), position_ids=position)  # fmt: skip
            hidden = hidden + torch.where(kept[..., None], attention, torch.zeros_like(attention))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            continue
        out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position)
        hidden = torch.where(kept[..., None], out, hidden)
    return model.lm_head(inner.norm(hidden))


def expected_shard(row: Row, sp_rank: int) -> dict[str, torch.Tensor]:
    """SP rank ``sp_rank``'s half of ``row`` as the adapter hands it out: labels shifted before sharding."""
    shifted = np.append(row.labels[1:], IGNORE_INDEX)
    half = slice(sp_rank * SEQ // SP, (sp_rank + 1) * SEQ // SP)
    fields = {"input_ids": row.input_ids, "position_ids": row.position_ids, "shift_labels": shifted}
    return {name: torch.from_numpy(values[half])[None] for name, values in fields.items()}  # [1, s / sp] each


def same_shard(batch: dict[str, torch.Tensor], row: Row, sp_rank: int) -> bool:
    return all(torch.equal(batch[name], value) for name, value in expected_shard(row, sp_rank).items())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--mode", choices=("dense", "sparse", "plain"), required=True)
    parser.add_argument("--zero-stage", type=int, choices=(2, 3), default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel groups (the job needs dp x 2 ranks)")
    parser.add_argument("--eliminate", default="layer", choices=("layer", "attention"))
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world != args.dp * SP:
        raise SystemExit(f"--dp {args.dp} x sequence_parallel_size {SP} needs {args.dp * SP} ranks, not {world}")
    sparse = {**SPARSE, "eliminate": args.eliminate}
    lemo = None if args.mode == "plain" else sparse if args.mode == "sparse" else DENSE
    config = ds_config(args.zero_stage, lemo, sequence_parallel_size=SP)
    sequence_parallel.check_dims(sp=SP, world_size=world, seq_len=SEQ, block_size=BLOCK, heads=4, kv_heads=2)

    # Hugging Face detects packed documents from position_ids only without a cache.
    reference = build(seed=0, use_cache=False)  # plain, on every rank
    rows = [make_row(i) for i in range(2 * args.dp)]  # two micro-steps of every data-parallel group
    # The reference runs before SP is set up: Ulysses replaces the process-wide "sdpa" attention function.
    ref_losses = [reference_loss(reference, row, sparse if args.mode == "sparse" else None) for row in rows[: args.dp]]
    (sum(ref_losses) / args.dp).backward()  # the gradient DeepSpeed averages over the data-parallel groups
    model = zero_model(config, reference, args.checkpointing, use_cache=False)
    # What launch/train.py does with its job's ParallelDims.
    dims = parallel.ParallelDims(world_size=world, sp=SP, micro_batch=1, grad_accum=1)
    sp = parallel.setup(dims, model)
    engine = lemo_engine(model, config, mpu=sp.mpu)
    dp_rank, sp_rank = sp.dp_rank, sp.rank
    layout_ok = dims.dp == args.dp and (dp_rank, sp_rank) == divmod(rank, SP)

    batches = parallel.rank_batches(rows, dims, sp, rank, device=torch.device("cpu"))
    batch = next(batches)  # micro-step 0: row dp_rank, this rank's half, labels shifted before sharding
    rows_ok = same_shard(batch, rows[dp_rank], sp_rank)
    loss, group_loss = parallel.forward_loss(engine, batch, sp)
    engine.backward(loss)
    grads = full_grads(engine)
    rows_ok = rows_ok and same_shard(next(batches), rows[args.dp + dp_rank], sp_rank)  # micro-step 1

    ref_loss = ref_losses[dp_rank].item()
    worst = max_grad_diff(grads, reference)
    scale = max(theirs.grad.abs().max().item() for theirs in reference.parameters())
    controller = lemo_ds.get_controller(engine.module)
    keep = controller.stats()["keep_ratio_per_layer"] if controller is not None else None
    ok = layout_ok and rows_ok and abs(group_loss.item() - ref_loss) < 1e-5 and worst < 1e-5 * max(1.0, scale)
    if args.mode == "sparse":
        ok = ok and keep[0] == 1.0 and max(keep[1:]) < 0.6
    report = {"rank": rank, "dp_rank": dp_rank, "sp_rank": sp_rank, "mode": args.mode, "zero_stage": args.zero_stage,
              "loss": group_loss.item(), "reference_loss": ref_loss,
              "reference_losses": [value.item() for value in ref_losses], "max_grad_diff": worst,
              "grad_scale": scale, "keep_ratio_per_layer": keep, "layout_ok": layout_ok, "rows_ok": rows_ok,
              "ok": ok}  # fmt: skip
    write_report(report)
    return 0 if ok else 1


if __name__ == "__main__":
    leave(main())
