"""Which pretraining curriculum gives a reference model that retrieves a passkey at its own (short) context?

The accuracy benchmark's retrieval question (does choosing which blocks to keep matter?) needs a reference that
retrieves at all; books alone did not teach it at the benchmark's budget. Each variant is the full recipe with
``FIELD=VALUE`` overrides of its pretraining (e.g. ``pretrain_induction_rate``); all variants pretrain at once, one
process each (one small model leaves an H200 mostly idle), on the same books with the same tokenizer, and each is
measured on held-out data at ``short_seq``: perplexity, copying loss on induction rows (the first copy of the segment
is unpredictable, ln(vocab); later copies near 0 once the model copies), and passkey accuracy and answer
log-likelihood (the evaluation rows of run.py's ``reference_passkey_short``).

    # one H200: four references at once (8 minutes), results in OUT/curriculum-<stamp>.{json,md}
    python benchmarks/accuracy/curriculum.py --books .bench_data/gutenberg --work outputs/curriculum --out OUT \\
      --variant 'seg20:pretrain_induction_rate=0.2,pretrain_induction_source="books"' \\
      --variant 'seg50:pretrain_induction_rate=0.5,pretrain_induction_source="books"' \\
      --variant 'seg90:pretrain_induction_rate=0.9,pretrain_induction_source="books"' \\
      --variant 'rand90:pretrain_induction_rate=0.9,pretrain_induction_source="random"'

    # the tiny recipe (CPU, what tests/test_accuracy.py runs)
    python benchmarks/accuracy/curriculum.py --recipe tiny --work /tmp/cur --out /tmp/cur/out --variant books:
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.accuracy import corpus, passkey, pretrain  # noqa: E402
from benchmarks.accuracy.recipe import RECIPES, Recipe  # noqa: E402
from benchmarks.accuracy.run import DEFAULT_BOOKS, log, override_recipe, passkey_eval_file  # noqa: E402
from benchmarks.harness import results  # noqa: E402

PROBE_ROWS = 16  # induction rows for the copying loss
SHARED_FIELDS = ("vocab_size", "heldout_every", "book_limit", "short_seq", "passkey_rows", "passkey_depths", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    parser.add_argument("--books", default=str(DEFAULT_BOOKS), help="folder of Project Gutenberg books (pg*.txt)")
    parser.add_argument("--work", default=str(REPO / "outputs" / "curriculum"), help="corpus, tokenizer, models")
    parser.add_argument("--out", default=str(results.DEFAULT_RESULTS_DIR), help="where the result files go")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                        help="a reference to pretrain (recipe overrides as in run.py --set); repeatable")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: this variant only
    return parser.parse_args(argv)


def parse_variants(recipe: Recipe, specs: list[str]) -> dict[str, Recipe]:
    """``NAME:FIELD=VALUE,...`` -> {NAME: the recipe with those overrides}; a bad field or value stops here."""
    variants = {}
    for spec in specs:
        name, sep, pairs = spec.partition(":")
        if not sep or not name or name in variants or not name.replace("-", "").replace("_", "").isalnum():
            raise SystemExit(f"--variant {spec!r}: expected a new NAME (letters, digits, - and _) then ':' and "
                             f"FIELD=VALUE pairs (none for the recipe as it is)")  # fmt: skip
        variants[name] = override_recipe(recipe, [pair for pair in pairs.split(",") if pair])
    return variants


@torch.no_grad()
def copying_loss(model, tokenizer, recipe: Recipe, device: torch.device, books: np.ndarray | None = None) -> dict:
    """Mean next-token loss on PROBE_ROWS induction rows: on the segment's first copy and on its later copies. The
    segments are uniform random ids, or with ``books`` (a held-out token stream) windows of it."""
    rng = np.random.default_rng([recipe.seed, 4])  # not a pretraining stream
    low = max(tokenizer.all_special_ids) + 1
    first, later = [], []
    for _ in range(PROBE_ROWS):
        row = pretrain.induction_row(rng, recipe.short_seq, low, recipe.vocab_size, tokenizer.bos_token_id, books)
        body = row[1:]
        period = next(p for p in range(8, len(body)) if np.array_equal(body[p:], body[:-p]))
        ids = torch.from_numpy(row)[None].to(device)  # [1, s]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits[0, :-1].float()  # [s - 1, V]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")  # [s - 1]; loss[i]: body[i]
        first.append(loss[1:period].mean().item())  # body[0] follows BOS: not a copy either way
        later.append(loss[period:].mean().item())
    return {"first_copy_loss": float(np.mean(first)), "later_copies_loss": float(np.mean(later))}


def measure_one(name: str, recipe: Recipe, books: Path, work: Path, device: torch.device) -> dict:
    """Pretrain one variant's reference and measure it; the record is also written to work/NAME.json."""
    from transformers import PreTrainedTokenizerFast

    split = corpus.prepare(books, work / "books", recipe.heldout_every, recipe.book_limit)  # made by the parent
    tokenizer = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    ids = pretrain.tokenize_books(tokenizer, split.train)
    started = time.perf_counter()
    model = pretrain.pretrain(recipe, tokenizer, ids, device, lambda message: log(f"{name}: {message}"))
    pretrain_s = time.perf_counter() - started
    copying = copying_loss(model, tokenizer, recipe, device)
    # The same probe on held-out book windows: copying the text's own tokens, which may come before copying any id.
    text_copying = copying_loss(model, tokenizer, recipe, device, pretrain.tokenize_books(tokenizer, split.heldout))
    reference = work / "references" / name  # not beside the corpus: a variant may be called "books"
    pretrain.save_reference(model, tokenizer, reference, recipe, {"pretrain_s": pretrain_s})
    del model
    record = {
        "name": name,
        "overrides": {k: v for k, v in recipe.as_dict().items() if v != getattr(RECIPES[recipe.name], k)},
        "pretrain_s": pretrain_s,
        "tokens_seen": recipe.pretrain_steps * recipe.pretrain_batch * recipe.short_seq,
        "short_ppl": pretrain.perplexity(reference, split.heldout, recipe.short_seq,
                                         recipe.eval_rows * recipe.extension, device, recipe.seed),  # fmt: skip
        **copying,
        **{f"text_{key}": value for key, value in text_copying.items()},
    }
    eval_file = work / f"passkey-eval-{recipe.short_seq}.jsonl"  # written by the parent
    if recipe.passkey_rows > 0:
        record["passkey"] = passkey.evaluate_model(reference, eval_file, device)
    (work / f"{name}.json").write_text(json.dumps(record, indent=1))
    log(f"{name}: perplexity {record['short_ppl']:.2f}, copying loss {copying['later_copies_loss']:.2f} (first copy "
        f"{copying['first_copy_loss']:.2f}; text {text_copying['later_copies_loss']:.2f} / "
        f"{text_copying['first_copy_loss']:.2f})" + (f", passkey accuracy {record['passkey']['passkey_accuracy']:.2f}"
                                                 if "passkey" in record else ""))  # fmt: skip
    return record


def markdown(document: dict) -> str:
    lines = [
        f"Pretraining curricula at {document['recipe']['short_seq']} tokens (held-out; the {document['recipe']['name']}"
        f" recipe, {document['recipe']['layers']} layers). Copying loss: induction rows, first copy / later copies, "
        "of random ids (ln vocab when nothing is copied) and of held-out text windows. Passkey: accuracy (answer "
        "log-likelihood per token).",
        "",
        "| variant | overrides | tokens | pretrain s | perplexity | copying loss, ids | copying loss, text | passkey |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in document["variants"]:
        if not r.get("ok", True):
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        key = r.get("passkey")
        lines.append(
            f"| {r['name']} | {', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or '(recipe)'} | "
            f"{r['tokens_seen'] / 1e6:.1f}M | {r['pretrain_s']:.0f} | {r['short_ppl']:.2f} | "
            f"{r['first_copy_loss']:.2f} / {r['later_copies_loss']:.2f} | "
            f"{r['text_first_copy_loss']:.2f} / {r['text_later_copies_loss']:.2f} | "
            + (f"{key['passkey_accuracy']:.2f} ({key['passkey_answer_loglik']:.2f})" if key else "-") + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = parse_variants(RECIPES[args.recipe], args.variant)
    work = Path(args.work)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.one is not None:
        measure_one(args.one, variants[args.one], Path(args.books), work, device)
        return 0

    from benchmarks.accuracy.tokenizer import train_tokenizer

    started = time.perf_counter()
    recipe = RECIPES[args.recipe]
    work.mkdir(parents=True, exist_ok=True)
    # The corpus, the tokenizer and the passkey rows once, before the children start (they share them: they
    # depend only on the books, the vocabulary size and the evaluation's settings, which no variant may change).
    for name, variant in variants.items():
        if any(getattr(variant, field) != getattr(recipe, field) for field in SHARED_FIELDS):
            raise SystemExit(f"--variant {name}: {', '.join(SHARED_FIELDS)} are shared by every variant")
    split = corpus.prepare(Path(args.books), work / "books", recipe.heldout_every, recipe.book_limit)
    train_tokenizer(split.train, recipe.vocab_size).save_pretrained(work / "tokenizer")
    passkey_eval_file(split, work, recipe, work / "tokenizer", recipe.short_seq)
    children = {}
    for name in variants:
        (work / f"{name}.json").unlink(missing_ok=True)
        command = [sys.executable, __file__, "--one", name, *(sys.argv[1:] if argv is None else argv)]
        children[name] = subprocess.Popen(command, cwd=REPO)
    records = []
    for name, child in children.items():
        code = child.wait()
        done = work / f"{name}.json"
        if code == 0 and done.is_file():
            records.append({"ok": True, **json.loads(done.read_text())})
        else:
            records.append({"name": name, "ok": False, "error": f"exit code {code}"})
    document = {
        "suite": "accuracy-curriculum",
        "command": results.command_line(),
        "environment": results.environment(include_device=device.type == "cuda"),
        "recipe": recipe.as_dict(),
        "variants": records,
        "total_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"curriculum-{recipe.name}-{results.timestamp()}"
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1))
    stem.with_suffix(".md").write_text(markdown(document))
    print(markdown(document))
    log(f"done in {document['total_s']:.0f} s; wrote {stem}.json, {stem}.md")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
