"""Which positions does a scorer let through every sparse layer, and what does that do to the loss they carry?

With lemo_ds's nested selection and ``loss_tokens: "processed"``, the positions that run through every sparse
layer are the only ones the training loss counts. A scorer therefore chooses two things at once: the context the
kept tokens attend to in the sparse layers, and the targets the fine-tuning learns from. This measures both, on
held-out rows, with the model frozen (no training):

- ``forward_gap``: mean loss of the processed targets under the sparse forward minus under the dense forward (how
  much the eliminated context costs the positions that carry the loss; an informed scorer should make it small);
- ``target_bias``: dense mean loss of the processed targets minus dense mean loss of every target (whether the
  scorer picks easier or harder targets than a uniform sample; a uniform sample gives about 0);
- ``mean_position``: mean relative position (0 = start of the row, 1 = end) of the processed targets.

    python benchmarks/accuracy/selection_bias.py --model outputs/accuracy/extended \\
        --heldout outputs/accuracy/books/heldout --seq-len 8192 --rows 16 --out selection_bias.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lemo_ds  # noqa: E402
from benchmarks.accuracy.recipe import NESTED  # noqa: E402
from benchmarks.harness import results  # noqa: E402
from lemo_ds.decoder_layer import is_sparse_layer  # noqa: E402
from lemo_ds.policies import policy_for  # noqa: E402
from lemo_ds.training import data  # noqa: E402

# How the accuracy benchmark's "nested" mode selects (its loss and dense layers are set here separately).
SELECTION = {key: NESTED[key] for key in ("nested_selection", "selection_window")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder (with its tokenizer)")
    parser.add_argument("--heldout", required=True, help="folder of held-out text files")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--scorers", default="oracle,norm,random,attention",
                        help='lemo scorers, and "attention" (AttentionMassScorer, this measurement only)')
    parser.add_argument("--dense-layers", default="auto", help='lemo dense_layers: "auto", "first_half" or a JSON list')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="the JSON result file")
    return parser.parse_args(argv)


class AttentionMassScorer:
    """Not a lemo_ds scorer: a measurement's alternative. Block J scores the attention probability mass its keys
    receive, summed over heads and over every query allowed to see them (softmax over each query's keys), instead
    of LeMo's positive query-key products. Exact, chunked over query rows: O(chunk x seq) memory."""

    name = "attention"

    def __init__(self, chunk_tokens: int = 1024) -> None:
        self.chunk_tokens = chunk_tokens

    def score(self, layer, hidden_states: torch.Tensor, context) -> torch.Tensor:
        from lemo_ds.core.selection import num_blocks
        from lemo_ds.kernels import allowed_pairs

        query, key = context.policy.query_key_states(layer, hidden_states, context.position_embeddings)
        batch, heads, seq, head_dim = query.shape  # [b, H, s, d]
        key = key.repeat_interleave(heads // key.shape[1], dim=1)  # [b, H, s, d]
        mass = torch.zeros(batch, seq, dtype=torch.float32, device=query.device)  # [b, s]
        # The pairs the layer attends, as the oracle reads them: the model's mask, else the row's documents.
        pairs = context.attention_mask if context.attention_mask is not None else context.doc_ids()
        for start in range(0, seq, self.chunk_tokens):
            stop = min(start + self.chunk_tokens, seq)
            logits = query[:, :, start:stop].float() @ key[:, :, :stop].float().transpose(-1, -2)  # [b, H, cq, k]
            allowed = allowed_pairs(pairs, slice(start, stop), stop, batch, query.device)  # [b, cq, k]
            logits = logits.mul_(head_dim**-0.5).masked_fill_(~allowed[:, None], float("-inf"))
            mass[:, :stop] += logits.softmax(-1).nan_to_num_(0.0).sum(dim=(1, 2))
        n = num_blocks(seq, context.block_size)
        return F.pad(mass, (0, n * context.block_size - seq)).view(batch, n, context.block_size).sum(-1)  # [b, n]


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[s - 1] float32 loss of each target (target t is token t + 1; ignored targets are NaN)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, :-1]  # [s - 1, V]
    targets = batch["labels"][0, 1:]  # [s - 1]
    losses = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")  # [s - 1]
    return losses.masked_fill(targets == -100, float("nan"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from lemo_ds.training.tokenizer import load_hf_tokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_hf_tokenizer(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    scorers = args.scorers.split(",")
    sparse = {}
    dense_layers = args.dense_layers if args.dense_layers in ("auto", "first_half") else json.loads(args.dense_layers)
    for scorer in scorers:
        section = {"keep_ratio": args.keep, "scorer": "norm" if scorer == "attention" else scorer,
                   "block_size": args.block_size, "seed": args.seed, "dense_layers": dense_layers,
                   "memory": {"segment_loss": False}, **SELECTION}  # fmt: skip
        # Training mode so the sparse layers eliminate (evaluation is dense); no dropout in these models.
        sparse[scorer] = lemo_ds.apply_lemo(copy.deepcopy(dense), section).train()
        if scorer == "attention":
            model = sparse[scorer]
            for layer in policy_for(model).decoder_layers(model):
                if is_sparse_layer(layer):
                    layer._lemo.sparse.scorer = AttentionMassScorer()
    files = data.discover_files(args.heldout, "--heldout")
    sums = {scorer: {"sparse": 0.0, "dense_processed": 0.0, "position": 0.0, "count": 0} for scorer in scorers}
    dense_sum, dense_count, rows = 0.0, 0, 0
    started = time.perf_counter()
    with torch.no_grad():
        for row in data.heldout_rows(files, tokenizer, args.seq_len, args.seed, limit=args.rows):
            batch = {k: torch.from_numpy(getattr(row, k))[None].to(device) for k in ("input_ids", "labels",
                                                                                    "position_ids")}  # fmt: skip
            reference = token_losses(dense, batch)  # [s - 1]
            counted = ~reference.isnan()  # [s - 1]
            dense_sum += float(reference[counted].sum())
            dense_count += int(counted.sum())
            where = torch.arange(reference.shape[0], device=device, dtype=torch.float32) / args.seq_len  # [s - 1]
            for scorer, model in sparse.items():
                ours = token_losses(model, batch)  # [s - 1]
                processed = lemo_ds.get_controller(model).processed_rows[0, :-1] & counted  # [s - 1]
                total = sums[scorer]
                total["sparse"] += float(ours[processed].sum())
                total["dense_processed"] += float(reference[processed].sum())
                total["position"] += float(where[processed].sum())
                total["count"] += int(processed.sum())
            rows += 1
    dense_mean = dense_sum / dense_count
    report = {}
    for scorer, total in sums.items():
        n = total["count"]
        report[scorer] = {
            "processed_share": n / dense_count,
            "forward_gap": (total["sparse"] - total["dense_processed"]) / n,
            "target_bias": total["dense_processed"] / n - dense_mean,
            "mean_position": total["position"] / n,
        }
    document = {"suite": "accuracy-selection-bias", "command": results.command_line(),
                "environment": results.environment(include_device=device.type == "cuda"), "args": vars(args),
                "rows": rows, "dense_mean_loss": dense_mean, "seconds": time.perf_counter() - started,
                "scorers": report}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1))
    print(f"dense mean loss {dense_mean:.4f} over {dense_count} targets in {rows} rows")
    print("| scorer | processed share | forward gap (nats) | target bias (nats) | mean position |")
    print("|---|---|---|---|---|")
    for scorer, entry in report.items():
        print(f"| {scorer} | {entry['processed_share']:.3f} | {entry['forward_gap']:+.4f} | "
              f"{entry['target_bias']:+.4f} | {entry['mean_position']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
