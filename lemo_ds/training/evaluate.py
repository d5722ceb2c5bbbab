"""Held-out evaluation at the end of a training run: dense perplexity, with the predictor scorer recall, and with
``--eval-passkey`` the accuracy of answers at the end of long prompts (passkey / needle retrieval).

Evaluation runs the model in eval mode, where lemo_ds's sparse layers are dense (unless ``apply_in_eval``): the
perplexity measures what fine-tuning with elimination taught the weights, on every token, as a user would see the
model afterwards. Each data-parallel rank evaluates its share of the held-out rows; the loss is the token-weighted
mean over all of them (sums of per-token losses and of counted tokens are all-reduced, never means of means).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from lemo_ds import distributed
from lemo_ds.memory.segment_loss import IGNORE_INDEX
from lemo_ds.predictors.calibrate import calibrate
from lemo_ds.training.data import jsonl_records


@torch.no_grad()
def heldout_perplexity(engine: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted cross-entropy over ``batches`` (this rank's), all-reduced: eval_loss, eval_ppl, eval_tokens.

    Every rank must pass the same number of batches (the forward passes of ZeRO-3 are collective)."""
    was_training = engine.training
    engine.eval()
    device = next(p for p in engine.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        # The model shifts labels by one inside; the tokens it counts are the next-token labels != -100.
        counted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # []
        loss = engine(**batch).loss  # mean over the counted tokens
        totals += torch.stack([loss.double() * counted, counted.double()])
    if distributed.initialized():
        torch.distributed.all_reduce(totals)
    engine.train(was_training)
    loss_sum, tokens = totals.tolist()
    if tokens == 0:
        return {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 0}
    mean = loss_sum / tokens
    return {"eval_loss": mean, "eval_ppl": math.exp(mean), "eval_tokens": int(tokens)}


def heldout_recall(engine: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The predictors' top-k recall against the oracle on ``batches`` (model frozen, no predictor update):
    ``predictor_recall`` (mean over sparse layers and batches, averaged over ranks) and one entry per layer."""
    sums: dict[int, float] = {}
    count = 0

    def on_batch(_: int, recall: dict[int, float]) -> None:
        nonlocal count
        count += 1
        for layer, value in recall.items():
            sums[layer] = sums.get(layer, 0.0) + value

    device = next(p for p in engine.parameters()).device
    on_device = ({key: value.to(device) for key, value in batch.items()} for batch in batches)
    calibrate(engine, on_device, updates=0, on_batch=on_batch)
    layers = sorted(sums)
    values = torch.tensor([sums[layer] / max(count, 1) for layer in layers], dtype=torch.float64, device=device)
    if distributed.initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    per_layer = dict(zip(layers, values.tolist(), strict=True))
    record = {"predictor_recall": sum(per_layer.values()) / max(len(per_layer), 1)}
    record.update({f"predictor_recall_layer{layer}": value for layer, value in per_layer.items()})
    return record


# ---- answer accuracy (passkey / needle retrieval) ------------------------------------------------------------


def read_answer_file(path: str) -> list[dict]:
    """The records of an ``--eval-passkey`` file: one JSON object per line with a string "prompt" and a non-empty
    string "answer", and optionally a "depth" (any JSON value: results are grouped by it). A bad file is a
    ValueError naming the line."""
    records = []
    for line_no, record in jsonl_records(path):
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("answer"), str) and record["answer"]):  # fmt: skip
            raise ValueError(f'{path}:{line_no}: expected an object with string "prompt" and "answer" fields')
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def answer_file_arg(path: str) -> str:
    """argparse ``type`` of ``--eval-passkey``: the path, once the file reads (a bad file stops the job before
    training, not after)."""
    import argparse

    try:
        read_answer_file(path)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return path


@torch.no_grad()
def answer_accuracy(engine: nn.Module, rows: Iterable[tuple[torch.Tensor, int, int, float]],
                    groups: int) -> torch.Tensor:  # fmt: skip
    """Teacher-forced greedy accuracy of answer spans. ``rows``: (ids [s] = prompt then answer, answer tokens n,
    group index, weight 0 or 1); the answer is the row's last ``n`` tokens. A row is correct when the argmax at
    every answer position is the answer's token. Returns [groups, 4] float64 sums over this rank's rows, weighted:
    (correct rows, rows, answer-token log-likelihood, answer tokens)."""
    was_training = engine.training
    engine.eval()
    device = next(p for p in engine.parameters()).device
    base = getattr(engine, "module", engine)
    # Only the last n + 1 positions' logits are needed; the full [s, V] logits may be large at long context. A
    # forward that passes its keywords on (lemo_ds's segment-loss mixin) takes logits_to_keep where a class below
    # it in the MRO does.
    takes_keep = any("logits_to_keep" in inspect.signature(cls.forward).parameters
                     for cls in type(base).__mro__ if "forward" in vars(cls))  # fmt: skip
    sums = torch.zeros(groups, 4, dtype=torch.float64, device=device)
    for ids, n, group, weight in rows:
        ids = ids.to(device)[None]  # [1, s]
        positions = torch.arange(ids.shape[1], device=device)[None]  # [1, s]: one document
        extra = {"logits_to_keep": n + 1} if takes_keep else {}
        logits = engine(input_ids=ids, position_ids=positions, use_cache=False, **extra).logits
        logits = logits[0, -(n + 1) : -1].float()  # [n, V]: position t predicts token t + 1
        answer = ids[0, -n:]  # [n]
        loglik = torch.log_softmax(logits, dim=-1).gather(1, answer[:, None]).sum()  # []
        correct = (logits.argmax(dim=-1) == answer).all().double()  # []
        sums[group] += weight * torch.stack([correct, torch.ones_like(correct), loglik.double(),
                                             torch.full_like(correct, n)])  # fmt: skip
    if distributed.initialized():
        torch.distributed.all_reduce(sums)
    engine.train(was_training)
    return sums


def passkey_evaluation(engine: nn.Module, path: str, tokenizer, log) -> dict:
    """``--eval-passkey FILE``: dense answer accuracy on every record of FILE (rows spread over the data-parallel
    ranks), overall and per "depth": passkey_accuracy, passkey_answer_loglik (mean over answer tokens),
    passkey_rows, passkey_by_depth {depth: {accuracy, answer_loglik, rows}}. A row is [BOS] prompt answer, the
    prompt and the answer tokenized apart (so the answer's tokens are known)."""
    started = time.perf_counter()
    records = read_answer_file(path)
    depths = sorted({json.dumps(r.get("depth")) for r in records})
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = -(-len(records) // world)

    def rows():
        # Every rank runs the same number of forwards (ZeRO-3's are collective): the last ranks repeat a row at
        # weight 0 when the records do not divide evenly.
        for index in range(rank, per_rank * world, world):
            record = records[min(index, len(records) - 1)]
            answer = tokenizer.encode(record["answer"])
            ids = np.concatenate([np.asarray(prefix, np.int64), tokenizer.encode(record["prompt"]), answer])
            group = depths.index(json.dumps(record.get("depth")))
            yield torch.from_numpy(ids), len(answer), group, float(index < len(records))

    sums = answer_accuracy(engine, rows(), len(depths)).tolist()  # [groups, 4]

    def summary(correct, count, loglik, tokens):
        return {"accuracy": correct / count, "answer_loglik": loglik / tokens, "rows": int(count)}

    total = summary(*(sum(column) for column in zip(*sums, strict=True)))
    # JSON keys are strings: a depth 0.1 is the key "0.1" (records without a depth: "null").
    by_depth = {depth: summary(*row) for depth, row in zip(depths, sums, strict=True)}
    result = {"passkey_accuracy": total["accuracy"], "passkey_answer_loglik": total["answer_loglik"],
              "passkey_rows": total["rows"], "passkey_by_depth": by_depth}  # fmt: skip
    log(
        f"passkey: {total['rows']} rows, accuracy {total['accuracy']:.3f}, answer log-likelihood "
        f"{total['answer_loglik']:.3f} (dense evaluation, {time.perf_counter() - started:.1f} s)"
    )
    return result
