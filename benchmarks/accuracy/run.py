"""The accuracy experiment in one command: LeMo's context extension in miniature, on real books.

    # one H200: pretrain (cached in outputs/accuracy), 8x context extension for every scorer and keep ratio,
    # held-out perplexity and predictor recall; results in benchmarks/results/accuracy-<stamp>.{json,md,png}
    python benchmarks/accuracy/run.py

    # the tiny recipe (CPU, about two minutes; what tests/test_accuracy.py runs)
    python benchmarks/accuracy/run.py --recipe tiny --work /tmp/acc --out /tmp/acc/results

Steps: (1) strip the Gutenberg header and licence of ../shared/data/gutenberg's books and split them by book into
train and held-out; (2) train a byte-level BPE tokenizer on the train books; (3) pretrain a small Llama at the
short context (1K); (4) give it RoPE scaling by 8 (the extended model; recipe.rope_scaling: linear or YaRN);
(5) LoRA fine-tune the extended model at 8K through launch/train.py, once per variant with the same data, steps
and seed: dense, and lemo with each scorer (predictor, oracle, norm, random) at keep 0.4 under LeMo's selection
rule and under lemo_ds's "nested" rule (recipe.NESTED), plus a keep-ratio sweep of the predictor; several runs
share the GPU at once; the predictors are trained offline first (launch/train_predictor.py on the extended model);
(6) every run evaluates dense perplexity on the held-out books at 8K (launch/train.py --eval-data) and, with the
predictor scorer, the predictors' top-k recall against the oracle on the same held-out rows; (7) passkey retrieval
(benchmarks/accuracy/passkey.py): the fine-tuning data holds recipe.passkey_rate of passkey rows (a number at a
random depth of book text, asked for at the end), and every run evaluates dense retrieval accuracy on held-out
passkey rows at 8K, by needle depth (launch/train.py --eval-passkey).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.accuracy import corpus, passkey, pretrain, report  # noqa: E402
from benchmarks.accuracy.recipe import RECIPES, RUN_FIELDS, Recipe  # noqa: E402
from benchmarks.accuracy.tokenizer import train_tokenizer  # noqa: E402
from benchmarks.harness import results  # noqa: E402
from lemo_ds.config import LEMO_ARTIFACT_SELECTION  # noqa: E402

DEFAULT_BOOKS = REPO.parent / "shared" / "data" / "gutenberg"
BASE_CONFIG = REPO / "ds_configs" / "zero2_lemo.json"


def log(message: str) -> None:
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="full")
    parser.add_argument("--books", default=str(DEFAULT_BOOKS), help="folder of Project Gutenberg books (pg*.txt)")
    parser.add_argument("--work", default=str(REPO / "outputs" / "accuracy"), help="corpus, models, runs (cache)")
    parser.add_argument("--out", default=str(results.DEFAULT_RESULTS_DIR), help="where the result files go")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (pretraining and baselines)")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: every run)")
    parser.add_argument("--mode", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help='an extra mode (lemo keys; JSON values), e.g. "processed:loss_tokens=processed"')
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="override a recipe field (JSON value), e.g. finetune_steps=1000; repeatable")
    return parser.parse_args(argv)


def override_recipe(recipe: Recipe, pairs: list[str]) -> Recipe:
    """The recipe with ``FIELD=VALUE`` overrides (values as JSON; tuples given as JSON lists)."""
    known = {f.name for f in dataclasses.fields(recipe)}
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in known or name == "name":
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(known - {'name'})}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--set {pair!r}: {value!r} is not a JSON value") from None
        changes[name] = tuple(tuple(x) if isinstance(x, list) else x for x in parsed) if isinstance(parsed, list) \
            else parsed
    try:
        return dataclasses.replace(recipe, **changes)
    except ValueError as error:
        raise SystemExit(f"--set: {error}") from None


@dataclass(frozen=True)
class FineTune:
    name: str  # "dense", "<scorer>@<keep>" or "<scorer>@<keep>+<mode>" ("dense+<mode>")
    scorer: str | None  # None: dense
    keep_ratio: float | None
    mode: str = ""
    extra: dict = field(default_factory=dict, hash=False)  # more "lemo" keys
    recipe_changes: dict = field(default_factory=dict, hash=False)  # fine-tuning fields of the recipe, this run only

    def recipe(self, recipe: Recipe) -> Recipe:
        return dataclasses.replace(recipe, **self.recipe_changes)


RECIPE_PREFIX = "recipe."


def parse_modes(specs: list[str]) -> dict[str, dict]:
    """``NAME:KEY=VALUE,...`` -> {NAME: {KEY: VALUE}} (values as JSON, else strings). A key is a "lemo" key, or
    ``recipe.FIELD`` for a fine-tuning field of the recipe (e.g. ``recipe.lr_schedule=constant``)."""
    modes = {}
    for spec in specs:
        name, _, pairs = spec.partition(":")
        settings = {}
        for pair in filter(None, pairs.split(",")):
            key, _, value = pair.partition("=")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        modes[name] = settings
    return modes


def split_mode(name: str, settings: dict) -> tuple[dict, dict]:
    """A mode's settings -> ("lemo" keys, recipe changes); a recipe change may only touch the fine-tuning (the
    reference model is shared by every run)."""
    lemo = {k: v for k, v in settings.items() if not k.startswith(RECIPE_PREFIX)}
    changes = {k.removeprefix(RECIPE_PREFIX): v for k, v in settings.items() if k.startswith(RECIPE_PREFIX)}
    for key in changes:
        if key not in RUN_FIELDS:
            raise SystemExit(f"mode {name!r}: recipe.{key} cannot change per run; allowed: {', '.join(RUN_FIELDS)}")
    return lemo, changes


def fine_tunes(recipe: Recipe, extra_modes: dict[str, dict]) -> list[FineTune]:
    """dense, the recipe's runs, and each extra mode (``--mode``) for every scorer of the recipe at its keep ratio.
    A run whose scorer is "dense" is a dense run under its mode's recipe changes."""
    modes = {**recipe.modes, **extra_modes}
    specs = list(recipe.runs)
    scorers = sorted({scorer for scorer, _, _ in recipe.runs})
    specs += [(scorer, recipe.keep_ratio, mode) for mode in extra_modes for scorer in scorers]
    runs = [FineTune("dense", None, None)]
    for scorer, keep, mode in specs:
        if mode not in modes:
            raise SystemExit(f"run ({scorer}, {keep}, {mode!r}): no mode {mode!r}; known: {sorted(modes)}")
        lemo, changes = split_mode(mode, modes[mode])
        if scorer == "dense":
            runs.append(FineTune("dense" + (f"+{mode}" if mode else ""), None, None, mode, {}, changes))
        else:
            name = f"{scorer}@{keep:g}" + (f"+{mode}" if mode else "")
            runs.append(FineTune(name, scorer, keep, mode, lemo, changes))
    return runs


def ds_config(run: FineTune, recipe: Recipe) -> dict:
    """ZeRO-2 on one GPU (launch/train.py's AdamW), the recipe's learning-rate schedule, this run's "lemo" section."""
    config = json.loads(BASE_CONFIG.read_text())
    config.pop("_comment", None)
    config.pop("lemo")
    decay = recipe.lr_schedule == "linear"
    config["scheduler"] = {"type": "WarmupDecayLR" if decay else "WarmupLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": recipe.finetune_lr, "warmup_num_steps": recipe.finetune_warmup,
        "warmup_type": "linear", **({"total_num_steps": recipe.finetune_steps} if decay else {})}}  # fmt: skip
    if run.scorer is not None:
        config["lemo"] = lemo_section(run, recipe)
    return config


# A run's "lemo" section starts from LeMo's own rule (LEMO_ARTIFACT_SELECTION: independent choices, the loss on every
# token, LeMo's dense layers), which the mode "" means, with the run's keep ratio and scorer; a mode's keys change it
# (recipe.NESTED: the rule lemo_ds's defaults follow).


def lemo_section(run: FineTune, recipe: Recipe) -> dict:
    """The "lemo" section of a sparse run."""
    return {**LEMO_ARTIFACT_SELECTION, "keep_ratio": run.keep_ratio, "scorer": run.scorer,
            "block_size": recipe.block_size, **run.extra}  # fmt: skip


def prepare_models(recipe: Recipe, split: corpus.Split, work: Path, device: torch.device) -> tuple[Path, Path, dict]:
    """(reference dir, extended dir, pretraining facts): trained now, or reused when the recipe matches."""
    reference, extended = work / "reference", work / "extended"
    if pretrain.reference_is_cached(reference, recipe):
        log(f"reference model: cached in {reference}")
        facts = json.loads((reference / "lemo_accuracy.json").read_text())
    else:
        started = time.perf_counter()
        tokenizer = train_tokenizer(split.train, recipe.vocab_size)
        log(f"tokenizer: {len(tokenizer)} ids, trained in {time.perf_counter() - started:.1f} s")
        ids = pretrain.tokenize_books(tokenizer, split.train)
        log(f"train books: {len(split.train)}, {len(ids):,} tokens")
        t0 = time.perf_counter()
        model = pretrain.pretrain(recipe, tokenizer, ids, device, log)
        facts = {"train_tokens": int(len(ids)), "pretrain_s": time.perf_counter() - t0,
                 "tokens_seen": recipe.pretrain_steps * recipe.pretrain_batch * recipe.short_seq}  # fmt: skip
        pretrain.save_reference(model, tokenizer, reference, recipe, facts)
        del model
    pretrain.write_extended(reference, extended, recipe)
    return reference, extended, facts


def finetune_data(split: corpus.Split, work: Path, books: int | None) -> Path:
    """The folder of the first ``books`` train books (None: all of them), exactly those: what --data reads."""
    folder = work / f"finetune-{books if books is not None else 'all'}"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = split.train[:books]
    for stale in set(folder.iterdir()) - {folder / book.name for book in chosen}:
        stale.unlink()
    for book in chosen:
        if not (folder / book.name).exists():
            shutil.copyfile(book, folder / book.name)
    return folder


def training_data(split: corpus.Split, work: Path, books: int | None, recipe: Recipe, extended: Path) -> Path:
    """What --data reads: the first ``books`` train books as they are, or with ``recipe.passkey_rate`` trimmed to
    whole rows and mixed with passkey documents (passkey.write_training_data; kept while its inputs match)."""
    if recipe.passkey_rate <= 0:
        return finetune_data(split, work, books)
    from lemo_ds.training.tokenizer import load_hf_tokenizer

    chosen = split.train[:books]
    folder = work / f"finetune-{books if books is not None else 'all'}-passkey"
    key = passkey.data_key(recipe.reference_key(), chosen, recipe.long_seq, recipe.passkey_rate, recipe.seed)
    started = time.perf_counter()
    meta = passkey.write_training_data(load_hf_tokenizer(extended), chosen, folder, recipe.long_seq,
                                       recipe.passkey_rate, recipe.seed, key)  # fmt: skip
    log(f"fine-tuning data {folder.name}: {meta['book_rows']} rows of books, {meta['passkey_documents']} passkey "
        f"rows ({100 * meta['passkey_share']:.2f}%), ready in {time.perf_counter() - started:.1f} s")  # fmt: skip
    return folder


def passkey_eval_file(split: corpus.Split, work: Path, recipe: Recipe, model: Path, row_tokens: int) -> Path | None:
    """Held-out passkey rows of ``row_tokens`` tokens (at long_seq: what every run evaluates, --eval-passkey), or
    None when ``recipe.passkey_rows`` is 0."""
    if recipe.passkey_rows <= 0:
        return None
    from lemo_ds.training.tokenizer import load_hf_tokenizer

    return passkey.write_eval_file(load_hf_tokenizer(model), split.heldout, work / f"passkey-eval-{row_tokens}.jsonl",
                                   row_tokens, recipe.passkey_depths, recipe.passkey_rows, recipe.seed)  # fmt: skip


def predictor_layers(runs: list[FineTune], recipe: Recipe) -> list[int]:
    """Every layer that some predictor run makes sparse (one predictors file serves them all)."""
    from lemo_ds.config import parse_lemo_config

    sparse = set()
    for run in runs:
        if run.scorer == "predictor":
            ratios = parse_lemo_config(lemo_section(run, run.recipe(recipe))).layer_keep_ratios(recipe.layers)
            sparse |= {i for i, ratio in enumerate(ratios) if ratio < 1.0}
    return sorted(sparse)


def train_predictors(recipe: Recipe, extended: Path, finetune_dir: Path, work: Path, layers: list[int]):
    """launch/train_predictor.py on the extended model (frozen) and the fine-tuning books: the predictors file
    (for ``layers``) that every predictor run loads. Returns (process, log handle, command, file)."""
    job_dir = work / "predictors"
    job_dir.mkdir(parents=True, exist_ok=True)
    dense = [i for i in range(recipe.layers) if i not in layers]
    config = {"lemo": {**LEMO_ARTIFACT_SELECTION, "keep_ratio": recipe.keep_ratio, "scorer": "predictor",
                       "block_size": recipe.block_size, "dense_layers": dense}}  # fmt: skip
    (job_dir / "ds_config.json").write_text(json.dumps(config))
    out = job_dir / "predictors.safetensors"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "launch" / "train_predictor.py"), "--model", str(extended),
               "--data", str(finetune_dir), "--deepspeed", str(job_dir / "ds_config.json"),
               "--seq-len", str(recipe.long_seq), "--batches", str(recipe.predictor_batches),
               "--eval-batches", str(recipe.predictor_eval_batches), "--seed", str(recipe.seed),
               "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(recipe.threads_per_run), "PYTHONUNBUFFERED": "1"}
    handle = (job_dir / "train_predictor.log").open("w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO), handle, command, out


def launch(run: FineTune, recipe: Recipe, extended: Path, finetune_dir: Path, heldout_dir: Path, work: Path,
           predictors: Path | None = None, passkey_file: Path | None = None):  # fmt: skip
    run_dir = work / "runs" / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config_path = run_dir / "ds_config.json"
    config_path.write_text(json.dumps(ds_config(run, recipe), indent=1))
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", str(config_path),
               "--model", str(extended), "--data", str(finetune_dir), "--eval-data", str(heldout_dir),
               "--eval-rows", str(recipe.eval_rows), "--seq-len", str(recipe.long_seq),
               "--max-steps", str(recipe.finetune_steps), "--lora-r", str(recipe.lora_r),
               "--lr", str(recipe.finetune_lr), "--seed", str(recipe.seed), "--grad-ckpt", "off",
               "--output-dir", str(run_dir), "--no-save", "--log-every", "10"]  # fmt: skip
    if run.scorer == "predictor" and predictors is not None:
        command += ["--predictor", str(predictors)]
    if passkey_file is not None:
        command += ["--eval-passkey", str(passkey_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(recipe.threads_per_run), "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):  # each run is its own world
        env.pop(key, None)
    handle = (run_dir / "train.log").open("w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO), handle, command


def run_all(runs: list[FineTune], recipe: Recipe, extended: Path, split: corpus.Split, heldout_dir: Path,
            work: Path, passkey_file: Path | None = None) -> tuple[dict[str, dict], dict | None]:  # fmt: skip
    """Every fine-tuning run, ``recipe.parallel`` at a time (the predictor runs once the predictors are trained,
    the others meanwhile; with ``recipe.predictor_batches`` 0 every run at once, each predictor run calibrating its
    own); ({name: record}, the predictor training's record or None)."""
    pending, active, records = list(runs), {}, {}
    data_dirs = {books: training_data(split, work, books, recipe, extended)  # one folder per book count
                 for books in {run.recipe(recipe).finetune_books for run in runs} | {recipe.finetune_books}}
    job = None
    if recipe.predictor_batches > 0 and any(r.scorer == "predictor" for r in runs):
        job = train_predictors(recipe, extended, data_dirs[recipe.finetune_books], work,
                               predictor_layers(runs, recipe))  # fmt: skip
    job_started, job_record, predictors = time.perf_counter(), None, None
    while pending or active or (job is not None and job_record is None):
        if job is not None and job_record is None and job[0].poll() is not None:
            job[1].close()
            ok = job[0].returncode == 0 and job[3].is_file()
            job_record = {"ok": ok, "exit_code": job[0].returncode, "wall_s": time.perf_counter() - job_started,
                          "command": " ".join(job[2]),
                          "log_tail": _tail(job[3].parent / "train_predictor.log", 40)}  # fmt: skip
            predictors = job[3] if ok else None
            log(f"predictors: {'trained' if ok else 'FAILED (see ' + str(job[3].parent) + '/train_predictor.log)'}")
        waiting = job is not None and job_record is None
        for run in [r for r in pending if not (waiting and r.scorer == "predictor")]:
            if len(active) >= recipe.parallel:
                break
            pending.remove(run)
            if run.scorer == "predictor" and job is not None and predictors is None:
                records[run.name] = {"name": run.name, "scorer": run.scorer, "keep_ratio": run.keep_ratio,
                                     "mode": run.mode, "ok": False, "log_tail": ["no predictors file"]}  # fmt: skip
                continue
            own = run.recipe(recipe)
            active[run.name] = (run, time.perf_counter(), *launch(run, own, extended, data_dirs[own.finetune_books],
                                                                  heldout_dir, work, predictors,
                                                                  passkey_file))  # fmt: skip
        time.sleep(1.0)
        for name, (run, started, process, handle, command) in list(active.items()):
            if process.poll() is None:
                continue
            handle.close()
            del active[name]
            records[name] = collect(run, work / "runs" / name, process.returncode, time.perf_counter() - started,
                                    command)  # fmt: skip
            status = "ok" if records[name]["ok"] else f"FAILED (exit {process.returncode}, see train.log)"
            ppl, key = records[name].get("eval_ppl"), records[name].get("passkey_accuracy")
            log(f"run {name}: {status}" + (f", held-out perplexity {ppl:.3f}" if ppl else "")
                + (f", passkey accuracy {key:.3f}" if key is not None else ""))  # fmt: skip
    return records, job_record


def _tail(path: Path, lines: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


def collect(run: FineTune, run_dir: Path, code: int, wall_s: float, command: list[str]) -> dict:
    expect_passkey = "--eval-passkey" in command
    record = {"name": run.name, "scorer": run.scorer or "dense", "keep_ratio": run.keep_ratio, "mode": run.mode,
              "lemo_extra": run.extra, "recipe_changes": run.recipe_changes, "exit_code": code,
              "wall_s": wall_s, "command": " ".join(command), "ok": False}  # fmt: skip
    summary_path = run_dir / "summary.json"
    if code == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        keys = ("eval_loss", "eval_ppl", "eval_tokens", "final_loss", "mean_keep_ratio", "keep_ratio_per_layer",
                "tokens_per_s", "peak_mem_bytes", "predictor_recall", "passkey_accuracy", "passkey_answer_loglik",
                "passkey_rows", "passkey_by_depth")  # fmt: skip
        record.update({key: summary.get(key) for key in keys})
        record["predictor_recall_per_layer"] = {k.removeprefix("predictor_recall_layer"): v for k, v in summary.items()
                                                if k.startswith("predictor_recall_layer")}  # fmt: skip
        record["ok"] = summary.get("eval_ppl") is not None and (not expect_passkey or "passkey_accuracy" in summary)
    else:
        record["log_tail"] = _tail(run_dir / "train.log", 15)
    return record


def main(argv: list[str] | None = None) -> int:
    # Before any CUDA work: cuBLAS reads it when it starts (deterministic pretraining, see pretrain.pretrain).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = parse_args(argv)
    recipe = override_recipe(RECIPES[args.recipe], args.overrides)
    work, out = Path(args.work), Path(args.out)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    runs = fine_tunes(recipe, parse_modes(args.mode))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {run.name for run in runs}
        if unknown:  # a typo, or a run of a mode that recipe.runs does not list: refused before any work
            print(f"accuracy: error: --only names no run of this recipe: {', '.join(sorted(unknown))}; its runs: "
                  f"{', '.join(run.name for run in runs)} (add others with --set 'runs=[[SCORER, KEEP, MODE], ...]')",
                  file=sys.stderr)  # fmt: skip
            return 2
        runs = [run for run in runs if run.name in wanted]

    try:
        split = corpus.prepare(Path(args.books), work / "books", recipe.heldout_every, recipe.book_limit)
    except corpus.CorpusError as error:
        print(f"accuracy: error: {error}", file=sys.stderr)
        return 2
    log(f"books: {len(split.train)} train, {len(split.heldout)} held-out; fine-tuning reads "
        f"{len(split.train[: recipe.finetune_books])}")
    timings["corpus_s"] = time.perf_counter() - started

    reference, extended, facts = prepare_models(recipe, split, work, device)
    timings["reference_s"] = time.perf_counter() - started - timings["corpus_s"]
    heldout_dir = work / "books" / "heldout"
    baselines = {
        "reference_short_ppl": pretrain.perplexity(reference, split.heldout, recipe.short_seq, recipe.eval_rows
                                                   * recipe.extension, device, recipe.seed),  # fmt: skip
        "extended_long_ppl_before_finetune": pretrain.perplexity(extended, split.heldout, recipe.long_seq,
                                                                 recipe.eval_rows, device, recipe.seed),  # fmt: skip
    }
    log(f"held-out perplexity: reference at {recipe.short_seq} tokens {baselines['reference_short_ppl']:.3f}; "
        f"extended model at {recipe.long_seq} before fine-tuning {baselines['extended_long_ppl_before_finetune']:.3f}")
    passkey_file = passkey_eval_file(split, work, recipe, extended, recipe.long_seq)
    if passkey_file is not None:
        before = passkey.evaluate_model(extended, passkey_file, device)
        baselines["extended_passkey_before_finetune"] = before
        log(f"passkey accuracy of the extended model before fine-tuning: {before['passkey_accuracy']:.3f}")
    if passkey_file is not None:  # did pretraining teach retrieval at the short context?
        short = passkey_eval_file(split, work, recipe, reference, recipe.short_seq)
        baselines["reference_passkey_short"] = passkey.evaluate_model(reference, short, device)
        log(f"passkey accuracy of the reference model at {recipe.short_seq} tokens: "
            f"{baselines['reference_passkey_short']['passkey_accuracy']:.3f}")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    records, predictor_job = run_all(runs, recipe, extended, split, heldout_dir, work, passkey_file)
    timings["fine_tuning_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    document = {
        "suite": "accuracy",
        "status": "complete" if all(r["ok"] for r in records.values()) else "failed runs",
        "modes": {**recipe.modes, **parse_modes(args.mode)},
        "command": results.command_line(),
        "environment": results.environment(include_device=device.type == "cuda"),
        "recipe": recipe.as_dict(),
        "reference": {**facts, **baselines},
        "timings": timings,
        "predictor_training": predictor_job,
        "runs": [records[run.name] for run in runs],
    }
    paths = report.write(document, out, f"accuracy-{recipe.name}-{results.timestamp()}")
    print(report.markdown(document))
    log(f"done in {timings['total_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0 if document["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
