"""Train lemo_ds's block-score predictors offline: a frozen model, labels from the fused oracle, one file out.

Run from the repository root (one process, one device: the model is frozen and runs in eval mode):

    python launch/train_predictor.py --model /models/Meta-Llama-3-8B --data corpus/ --seq-len 16384 \
        --batches 400 --out predictors.safetensors

    # the CPU default: the tiny-llama preset on the Python stdlib, 1024 tokens
    python launch/train_predictor.py --out outputs/predictors.safetensors

Every training batch passes once through the model (dense, no gradients); at each sparse layer the layer input
gets the oracle's labels (scores and block-pair tiles, from the layer's own queries and keys) and the layer's
predictor takes ``--updates`` optimizer steps on them (tile regression plus a ranking loss). Then, on
``--eval-batches`` held-out batches (rows of the data stream that training never saw), it measures each layer's
top-k recall (the share of the oracle's chosen blocks the predictor also chooses, forced blocks left out), prunes
the ReLU units active on fewer than ``--prune-below`` of the blocks (elastic sizing), measures recall again, prints
the table and writes ``--out``: safetensors with the model's fingerprint, the design, the ranks after pruning and
the recall table. Which layers are sparse, their keep ratios, the block size and the predictor ranks come from
the "lemo" section of ``--deepspeed`` (as launch/train.py reads it), with ``--keep-ratio`` overriding the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout that was not pip-installed: import lemo_ds from here
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds.config import load_ds_config, parse_lemo_config  # noqa: E402
from lemo_ds.errors import LemoError, print_error_line  # noqa: E402
from lemo_ds.predictors import calibrate, save_predictors  # noqa: E402
from lemo_ds.predictors.calibrate import predictor_scorer_of  # noqa: E402
from lemo_ds.predictors.layer_inputs import for_each_layer_input  # noqa: E402
from lemo_ds.predictors.prune import UnitActivity, prune_predictor  # noqa: E402
from lemo_ds.training import data, model  # noqa: E402
from lemo_ds.training.errors import TrainingSetupError  # noqa: E402
from lemo_ds.training.flags import DEFAULT_CONFIG  # noqa: E402
from lemo_ds.training.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer  # noqa: E402

BUDGET = 0.02  # predictors may take at most 2% of their layer's parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=DEFAULT_PRESET, help=f"Hugging Face model directory, or a preset: {', '.join(PRESETS)}")
    add("--data", default=None, help='text file, .jsonl ("text" field) or folder; default: the Python stdlib')
    add("--out", required=True, help="predictors file to write (.safetensors)")
    add("--deepspeed", default=str(DEFAULT_CONFIG), metavar="CONFIG", help='config whose "lemo" section to use')
    add("--keep-ratio", type=float, default=None, help="keep ratio of the sparse layers (default: the config's)")
    add("--seq-len", type=int, default=1024, help="tokens per packed row")
    add("--batch-size", type=int, default=1, help="rows per batch")
    # 128: on the accuracy benchmark's model (8K rows) 96 batches reached recall 0.945 and 128 reached 0.955
    # (benchmarks/results/predictor-sweep-20261122/). 16 held-out batches instead of 4: four times the tokens behind
    # each figure of the recall table.
    add("--batches", type=int, default=128, help="training batches (each seen once)")
    add("--eval-batches", type=int, default=16, help="held-out batches for the recall table and pruning")
    add("--updates", type=int, default=None, help="optimizer steps per layer per batch (default: the config's)")
    add("--prune-below", type=float, default=0.01, help="prune units active on fewer of the blocks (0: no pruning)")
    add("--seed", type=int, default=0, help="seed of the data order and of the predictors' init")
    add("--device", default="auto", help="cuda, cpu or auto")
    args = parser.parse_args(argv)
    for name in ("seq_len", "batch_size", "batches", "eval_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.prune_below < 1.0:
        parser.error("--prune-below must be in [0, 1)")
    return args


def lemo_section(args: argparse.Namespace) -> dict:
    """The config's "lemo" section set to train predictors from scratch (the oracle scores any untrained layer)."""
    section = dict(load_ds_config(args.deepspeed).get("lemo") or {})
    section.update(scorer="predictor", predictor_path=None)
    if args.keep_ratio is not None:
        section["keep_ratio"] = args.keep_ratio
    if args.updates is not None:
        section["predictor"] = {**section.get("predictor", {}), "calibration_updates": args.updates}
    parse_lemo_config(section)  # a bad section fails here, with the key named
    return section


def build(args: argparse.Namespace):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    source = model.resolve_model(args.model)
    section = lemo_section(args)
    if args.seq_len < parse_lemo_config(section).block_size:
        raise TrainingSetupError(f"--seq-len {args.seq_len} is shorter than one lemo block")
    tokenizer = ByteTokenizer() if source.kind == "preset" else load_hf_tokenizer(args.model)
    files = data.discover_files(args.data)
    data.check_corpus(files, tokenizer, args.seq_len, args.data)
    net = model.build_model(source, dtype, args.seed).to(device)
    for param in net.parameters():
        param.requires_grad_(False)  # frozen: only the predictors train
    lemo_ds.apply_lemo(net, {**section, "seed": args.seed})
    return net, source, tokenizer, files, device


def batches_of(rows, batch_size: int, device: torch.device):
    """Batches of ``batch_size`` packed rows: input_ids and position_ids [b, s] on ``device``."""
    while True:
        chunk = list(itertools.islice(rows, batch_size))
        if len(chunk) < batch_size:
            return
        yield {
            "input_ids": torch.stack([torch.from_numpy(r.input_ids) for r in chunk]).to(device),
            "position_ids": torch.stack([torch.from_numpy(r.position_ids) for r in chunk]).to(device),
        }


def held_out_recall(net, scorer, batches: list[dict]) -> dict[int, tuple[float, float]]:
    """{layer: (predictor recall, positional prior recall)}, means over ``batches``, no training."""
    calibrate(net, batches, updates=0)
    table = {}
    for index in scorer.trainer.sparse_layers:
        recent = scorer.trainer.history[index][-len(batches):]
        table[index] = (sum(o.recall for o in recent) / len(recent), sum(o.prior_recall for o in recent) / len(recent))
    return table


def prune(net, scorer, batches: list[dict], min_activity: float) -> None:
    """Replace every predictor by its pruned copy (activity counted over ``batches``)."""
    activity = {i: UnitActivity(scorer.bank.get(i)) for i in scorer.trainer.sparse_layers}

    def count(layer, hidden, context) -> None:
        activity[context.layer_index].add(scorer.bank.get(context.layer_index), hidden, context.block_size)

    for_each_layer_input(net, batches, scorer.trainer.sparse_layers, scorer.config.block_size, count)
    for index, counts in activity.items():
        scorer.bank.set(index, prune_predictor(scorer.bank.get(index), counts, min_activity))
        scorer.trainer.reset_optimizer(index)
        scorer._packed.clear()


def recall_table(rows: list[dict], keep: dict[int, float]) -> str:
    lines = ["| layer | keep | recall | recall after pruning | positional prior | scored by | units q/k | parameters | "
             "share of layer |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['layer']} | {keep[row['layer']]:.2f} | {row['recall']:.3f} | "
                     f"{row['recall_pruned']:.3f} | "
                     f"{row['prior']:.3f} | {'prior' if row['use_prior'] else 'predictor'} | {row['units_q']}/"
                     f"{row['units_k']} | {row['parameters']:,} | {row['share']:.3%} |")  # fmt: skip
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    chosen = sum(r["prior"] if r["use_prior"] else r["recall_pruned"] for r in rows)
    lines.append(f"| mean | | {mean('recall'):.3f} | {mean('recall_pruned'):.3f} | {mean('prior'):.3f} | "
                 f"{chosen / len(rows):.3f} (as scored) | | | {mean('share'):.3%} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="lemo predictor scorer: layer")  # untrained layers: expected here
    try:
        net, source, tokenizer, files, device = build(args)
    except LemoError as error:
        print_error_line(error)
        return 2
    scorer = predictor_scorer_of(net)
    rows = data.packed_rows(files, tokenizer, args.seq_len, args.seed)
    eval_batches = list(batches_of(itertools.islice(rows, args.eval_batches * args.batch_size), args.batch_size,
                                   device))  # fmt: skip
    train_batches = batches_of(itertools.islice(rows, args.batches * args.batch_size), args.batch_size, device)
    layers = scorer.trainer.sparse_layers
    print(f"lemo_ds: predictors for layers {layers} of {args.model} ({source.config.model_type}), block "
          f"{scorer.config.block_size}, {args.batches} x {args.batch_size} x {args.seq_len} tokens, "
          f"on {device}")  # fmt: skip

    started = time.perf_counter()
    bar = tqdm(total=args.batches, desc="predictors", dynamic_ncols=True)

    def progress(_: int, recall: dict[int, float]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"recall {sum(recall.values()) / max(len(recall), 1):.3f} (batch before training on it)")

    calibrate(net, train_batches, on_batch=progress)
    bar.close()
    recall = held_out_recall(net, scorer, eval_batches)
    if args.prune_below > 0:
        prune(net, scorer, eval_batches, args.prune_below)
        recall_pruned = held_out_recall(net, scorer, eval_batches)
    else:
        recall_pruned = recall
    prior_layers = [i for i in layers if recall_pruned[i][1] > recall_pruned[i][0]]  # scored by the prior

    decoder_layers = lemo_ds.policies.policy_for(net).decoder_layers(net)
    table = []
    for index in layers:
        predictor = scorer.bank.get(index)
        layer_params = sum(p.numel() for p in decoder_layers[index].parameters())
        units_q, units_k = predictor.hidden_units
        table.append({"layer": index, "recall": recall[index][0], "recall_pruned": recall_pruned[index][0],
                      "prior": recall_pruned[index][1], "use_prior": index in prior_layers, "units_q": units_q,
                      "units_k": units_k, "parameters": predictor.parameter_count(),
                      "share": predictor.parameter_count() / layer_params})  # fmt: skip
    keep = scorer.trainer.rule.keep_ratios
    print(f"\nheld-out top-k recall ({args.eval_batches} x {args.batch_size} x {args.seq_len} tokens; forced blocks "
          f"left out), {time.perf_counter() - started:.0f} s:\n{recall_table(table, keep)}")  # fmt: skip
    over = [row["layer"] for row in table if row["share"] > BUDGET]
    if over:
        print(f"lemo_ds: note: predictors of layers {over} exceed {BUDGET:.0%} of their layer's parameters (a small "
              "model); lower lemo.predictor.hidden_rank for a real budget")  # fmt: skip
    info = {"recall": {str(r["layer"]): r["recall_pruned"] for r in table}, "recall_before_pruning":
            {str(r["layer"]): r["recall"] for r in table}, "prior_recall": {str(r["layer"]): r["prior"] for r in table},
            "keep_ratio": {str(i): k for i, k in keep.items()},
            "model": args.model, "data": args.data, "seq_len": args.seq_len, "batches": args.batches,
            "batch_size": args.batch_size, "prune_below": args.prune_below, "seed": args.seed}  # fmt: skip
    save_predictors(args.out, scorer.bank, scorer.fingerprint, info, prior_layers)
    print(f"lemo_ds: wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
