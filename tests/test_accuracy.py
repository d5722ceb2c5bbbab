"""The accuracy benchmark: the Gutenberg corpus split, held-out evaluation in launch/train.py, and the whole
pipeline on the tiny recipe (real books, real tokenizer training, real pretraining and launch/train.py runs)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy.corpus import CorpusError, prepare, strip_gutenberg
from lemo_ds.training.evaluate import heldout_perplexity

REPO = Path(__file__).resolve().parent.parent
# $LEMO_GUTENBERG: where the books are on a machine without ../shared (the GPU machine unpacks them in /tmp).
BOOKS = Path(os.environ.get("LEMO_GUTENBERG", REPO.parent / "shared" / "data" / "gutenberg"))

BOOK = """The Project Gutenberg eBook of Something\r
licence text\r
*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\r
Chapter 1\r
It was a dark night.\r
*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\r
more licence\r
"""


def test_strip_gutenberg_keeps_only_the_book():
    assert strip_gutenberg(BOOK) == "Chapter 1\nIt was a dark night.\n"
    # the other spelling of the markers
    other = BOOK.replace("*** START OF THE", "***START OF THIS").replace("*** END OF THE", "***END OF THIS")
    assert strip_gutenberg(other) == "Chapter 1\nIt was a dark night.\n"
    with pytest.raises(CorpusError, match="START OF"):
        strip_gutenberg("no markers here", "x.txt")


def test_split_is_by_whole_book_and_disjoint(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(9):
        (source / f"pg{i}_book.txt").write_text(BOOK.replace("dark night", f"night number {i}"))
    split = prepare(source, tmp_path / "out", heldout_every=4)
    assert [p.name for p in split.heldout] == ["pg3_book.txt", "pg7_book.txt"]
    assert not {p.name for p in split.train} & {p.name for p in split.heldout}
    assert len(split.train) + len(split.heldout) == 9
    assert "licence" not in split.train[0].read_text()
    with pytest.raises(CorpusError, match="fewer than heldout_every"):
        prepare(source, tmp_path / "out2", heldout_every=20)


def test_heldout_perplexity_is_the_token_weighted_mean():
    """Two batches with different numbers of counted tokens: the result weights each token equally (a mean of the
    batch means would not), computed against logits by hand."""
    from tiny_models import VOCAB, tiny_model

    model = tiny_model("llama").eval()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for ignored in (0, 20):
        ids = torch.randint(1, VOCAB, (1, 32), generator=generator)
        labels = ids.clone()
        labels[0, 1 : 1 + ignored] = -100
        batches.append({"input_ids": ids, "labels": labels})
    result = heldout_perplexity(model, batches)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1].double()  # [s - 1, V]
            targets = batch["labels"][0, 1:]
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    assert result["eval_tokens"] == count == 31 + 11
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["eval_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training is False


@pytest.mark.slow
@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/data/gutenberg")
def test_tiny_accuracy_pipeline_end_to_end(tmp_path):
    """benchmarks/accuracy/run.py --recipe tiny: corpus, tokenizer, pretraining, extended model, the predictors
    trained offline, and every fine-tuning run through launch/train.py with held-out evaluation."""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accuracy" / "run.py"), "--recipe", "tiny", "--work",
         str(tmp_path / "work"), "--out", str(out), "--books", str(BOOKS)],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result_path,) = out.glob("accuracy-tiny-*.json")
    document = json.loads(result_path.read_text())
    assert document["status"] == "complete"
    names = {run["name"] for run in document["runs"]}
    assert names == {"dense", "predictor@0.4", "random@0.4", "predictor@0.4+nested"}
    for run in document["runs"]:
        assert run["ok"] and math.isfinite(run["eval_ppl"]) and run["eval_tokens"] > 0
        assert run["eval_tokens"] == document["runs"][0]["eval_tokens"]  # every run evaluates the same rows
        if run["scorer"] == "predictor":
            assert 0.0 <= run["predictor_recall"] <= 1.0
            assert "--predictor" in run["command"]  # the offline-trained file
        if run["scorer"] != "dense":
            assert run["mean_keep_ratio"] < 1.0
    nested = next(r for r in document["runs"] if r["mode"] == "nested")
    assert nested["lemo_extra"] == {"loss_tokens": "processed", "nested_selection": True, "selection_window": 8,
                                    "dense_layers": "first_half"}  # fmt: skip
    # One predictors file for both runs: layer 2 (LeMo's "auto") and layers 2-3 ("first_half") of the 4.
    trained = json.loads((tmp_path / "work" / "predictors" / "ds_config.json").read_text())
    assert trained["lemo"]["dense_layers"] == [0, 1]
    assert document["predictor_training"]["ok"]
    assert (out / result_path.name.replace(".json", ".md")).read_text().count("| ") > 4
    assert document["reference"]["reference_short_ppl"] > 1.0
    # Passkey retrieval: every run evaluated the same held-out rows, 2 per depth; the fine-tuning data mixed in
    # passkey documents.
    for run in document["runs"]:
        assert "--eval-passkey" in run["command"] and run["passkey_rows"] == 10
        assert set(run["passkey_by_depth"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
        assert all(entry["rows"] == 2 and 0.0 <= entry["accuracy"] <= 1.0 for entry in run["passkey_by_depth"].values())
        assert 0.0 <= run["passkey_accuracy"] <= 1.0 and run["passkey_answer_loglik"] < 0.0
    assert document["reference"]["extended_passkey_before_finetune"]["passkey_rows"] == 10
    # The tiny recipe pretrains with passkey rows; the reference is scored on held-out rows of its own length.
    assert document["reference"]["reference_passkey_short"]["passkey_rows"] == 10
    assert len(list((tmp_path / "work" / "finetune-2-passkey").glob("passkey-*.txt"))) > 0
    assert "Passkey retrieval" in (out / result_path.name.replace(".json", ".md")).read_text()

    # The selection-bias measurement on the pipeline's extended model (benchmarks/accuracy/selection_bias.py).
    from benchmarks.accuracy import selection_bias

    bias_path = tmp_path / "bias.json"
    work = tmp_path / "work"
    assert selection_bias.main(["--model", str(work / "extended"), "--heldout", str(work / "books" / "heldout"),
                                "--seq-len", "256", "--rows", "2", "--block-size", "16", "--device", "cpu",
                                "--dense-layers", "first_half", "--out", str(bias_path)]) == 0  # fmt: skip
    bias = json.loads(bias_path.read_text())
    assert set(bias["scorers"]) == {"oracle", "norm", "random", "attention"} and bias["rows"] == 2
    for entry in bias["scorers"].values():
        assert 0.0 < entry["processed_share"] < 1.0 and 0.0 < entry["mean_position"] < 1.0
        assert math.isfinite(entry["forward_gap"]) and math.isfinite(entry["target_bias"])


def test_recipe_overrides_from_the_command_line():
    from benchmarks.accuracy.recipe import TINY
    from benchmarks.accuracy.run import override_recipe

    changed = override_recipe(TINY, ["finetune_steps=7", 'runs=[["oracle", 0.5, ""]]'])
    assert changed.finetune_steps == 7 and changed.runs == (("oracle", 0.5, ""),)
    assert changed.layers == TINY.layers
    for bad in ("no_such_field=1", "finetune_steps", "finetune_steps=abc", 'rope_scaling="yarm"'):
        with pytest.raises(SystemExit, match="--set"):
            override_recipe(TINY, [bad])


@pytest.mark.parametrize("scaling", ["linear", "yarn"])
def test_extended_model_has_the_recipes_rope_scaling(tmp_path, scaling):
    """write_extended's config loads in Hugging Face with the chosen rope type, and the extended model's rotary
    frequencies are the reference's interpolated by ``extension`` (linear: all of them; YaRN: the lowest ones, with
    the highest kept)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.accuracy import pretrain
    from benchmarks.accuracy.recipe import TINY

    recipe = dataclasses.replace(TINY, rope_scaling=scaling)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=recipe.short_seq,
                         rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta})  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "reference")
    pretrain.write_extended(tmp_path / "reference", tmp_path / "extended", recipe)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "reference")
    extended = AutoModelForCausalLM.from_pretrained(tmp_path / "extended")
    assert extended.config.rope_parameters["rope_type"] == scaling
    assert extended.config.max_position_embeddings == recipe.long_seq
    before, after = reference.model.rotary_emb.inv_freq, extended.model.rotary_emb.inv_freq  # [head_dim / 2]
    ratio = before / after
    if scaling == "linear":
        torch.testing.assert_close(ratio, torch.full_like(ratio, recipe.extension))
    else:
        assert ratio[0].item() == pytest.approx(1.0) and ratio[-1].item() == pytest.approx(recipe.extension)
        assert extended.model.rotary_emb.attention_scaling > 1.0


def test_a_mode_can_change_the_fine_tuning_of_its_runs(tmp_path):
    """``recipe.FIELD`` keys of a mode change that run's fine-tuning (a "dense" scorer is a dense run under them);
    the shared model's fields cannot change per run."""
    import dataclasses

    from benchmarks.accuracy.recipe import TINY
    from benchmarks.accuracy.run import ds_config, fine_tunes, parse_modes

    recipe = dataclasses.replace(TINY, runs=(("dense", 1.0, "const"), ("oracle", 0.4, "const")))
    runs = {run.name: run for run in fine_tunes(recipe, parse_modes(["const:recipe.lr_schedule=constant,seed=3"]))}
    assert set(runs) == {"dense", "dense+const", "oracle@0.4+const"}
    assert runs["dense+const"].scorer is None and runs["dense+const"].extra == {}
    assert runs["oracle@0.4+const"].extra == {"seed": 3}
    constant = ds_config(runs["oracle@0.4+const"], runs["oracle@0.4+const"].recipe(recipe))
    decay = ds_config(runs["dense"], runs["dense"].recipe(recipe))
    assert constant["scheduler"]["type"] == "WarmupLR" and constant["lemo"]["seed"] == 3
    assert decay["scheduler"]["type"] == "WarmupDecayLR" and "lemo" not in decay
    assert decay["scheduler"]["params"]["total_num_steps"] == TINY.finetune_steps
    with pytest.raises(SystemExit, match="recipe.layers cannot change per run"):
        fine_tunes(recipe, parse_modes(["const:recipe.layers=2"]))
    with pytest.raises(SystemExit, match="no mode 'nope'"):
        fine_tunes(dataclasses.replace(TINY, runs=(("oracle", 0.4, "nope"),)), {})


def test_fine_tuning_data_holds_exactly_the_chosen_books(tmp_path):
    from benchmarks.accuracy.corpus import Split
    from benchmarks.accuracy.run import finetune_data

    books = []
    for i in range(3):
        books.append(tmp_path / f"pg{i}.txt")
        books[-1].write_text(f"book {i}")
    split = Split(train=books, heldout=[])
    assert sorted(p.name for p in finetune_data(split, tmp_path / "w", None).iterdir()) == ["pg0.txt", "pg1.txt",
                                                                                         "pg2.txt"]  # fmt: skip
    folder = tmp_path / "w" / "finetune-1"
    folder.mkdir(parents=True)
    (folder / "pg2.txt").write_text("left from another run")
    assert [p.name for p in finetune_data(split, tmp_path / "w", 1).iterdir()] == ["pg0.txt"]


@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/data/gutenberg")
def test_pretraining_is_bitwise_repeatable(tmp_path):
    """Two pretrainings of one recipe give the same weights, bit for bit (on CUDA this needs the deterministic mode
    that pretrain.pretrain sets; the tiny recipe's shapes, a few steps)."""
    import dataclasses

    from benchmarks.accuracy import pretrain
    from benchmarks.accuracy.recipe import TINY
    from benchmarks.accuracy.tokenizer import train_tokenizer

    recipe = dataclasses.replace(TINY, pretrain_steps=4)
    split = prepare(BOOKS, tmp_path / "books", recipe.heldout_every, recipe.book_limit)
    tokenizer = train_tokenizer(split.train[:2], recipe.vocab_size)
    ids = pretrain.tokenize_books(tokenizer, split.train[:2])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first, second = (pretrain.pretrain(recipe, tokenizer, ids, device, lambda message: None).state_dict()
                     for _ in range(2))  # fmt: skip
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards


def test_attention_mass_scorer_sums_the_models_own_attention_weights():
    """selection_bias.AttentionMassScorer: block J's score is the attention probability its keys receive, summed over
    heads and queries; checked against the weights Hugging Face's eager attention returns (output_attentions)."""
    from tiny_models import VOCAB, tiny_model

    from benchmarks.accuracy.selection_bias import AttentionMassScorer
    from lemo_ds.policies import policy_for
    from lemo_ds.scorers.base import ScoreContext

    model = tiny_model("llama", attn="eager").eval()
    seen = {}
    layer = model.model.layers[2]
    layer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs=kwargs, hidden=args[0] if args
                                    else kwargs["hidden_states"]), with_kwargs=True)  # fmt: skip
    ids = torch.randint(1, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))  # 45: a partial last block
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions[2]  # [b, H, s, s]
        context = ScoreContext(2, 8, seen["kwargs"]["position_embeddings"], None, policy_for(model), 0, 0, 0)
        scores = AttentionMassScorer(chunk_tokens=16).score(layer, seen["hidden"], context)  # [b, 6]
    mass = torch.nn.functional.pad(weights.sum(dim=(1, 2)), (0, 3)).view(2, 6, 8).sum(-1)  # [b, 6]
    torch.testing.assert_close(scores, mass.float(), atol=1e-4, rtol=1e-4)
    assert scores.sum(1).allclose(torch.full((2,), 45.0 * 4))  # every query row of every head sums to one


# ---- passkey retrieval (benchmarks/accuracy/passkey.py, lemo_ds.training.evaluate.passkey_evaluation) -------------


def _prose_books(folder: Path, count: int, words: int) -> list[Path]:
    """Book-like text without digits (the pass key is the only number), and a small tokenizer trained on it."""
    import numpy as np

    vocab = "the a cat dog sat ran on under old house river and then she he was by light night".split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        sentences = [" ".join(rng.choice(vocab, size=int(rng.integers(4, 12)))).capitalize() + "." for _ in
                     range(words // 8)]  # fmt: skip
        paths.append(folder / f"pg{index}.txt")
        paths[-1].write_text("\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)))
    return paths


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    from benchmarks.accuracy.tokenizer import train_tokenizer
    from lemo_ds.training.tokenizer import HFTokenizer

    paths = _prose_books(tmp_path_factory.mktemp("prose"), 3, 6000)
    return paths, HFTokenizer(train_tokenizer(paths, 320))


def test_passkey_needle_sits_at_the_requested_depth(prose):
    """The needle's tokens start after round(depth * haystack) haystack tokens of the prompt, the document is
    exactly the asked length, and it tokenizes the same whole (training) as prompt and answer apart (evaluation)."""
    import numpy as np

    from benchmarks.accuracy import passkey

    paths, tokenizer = prose
    text = paths[0].read_text()
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        key = passkey.make_passkey(tokenizer, text, rng, depth, 200)
        prompt, answer = tokenizer.encode(key.prompt), tokenizer.encode(key.answer)
        needle = tokenizer.encode(passkey.NEEDLE.format(key=key.key))
        assert key.needle_token == round(depth * key.haystack_tokens)
        assert np.array_equal(prompt[key.needle_token : key.needle_token + len(needle)], needle)
        assert len(prompt) + len(answer) == 200
        assert np.array_equal(tokenizer.encode(key.prompt + key.answer), np.concatenate([prompt, answer]))
        assert key.prompt.count(str(key.key)) == 2 and key.answer == f" {key.key}"


def test_passkey_training_data_keeps_the_rate_and_whole_rows(prose, tmp_path):
    """The fine-tuning folder packs (launch/train.py's own packing) into rows that are each one whole document,
    passkey_rate of them passkey documents; the same seed writes the same files."""
    import numpy as np

    from benchmarks.accuracy import passkey
    from lemo_ds.training import data

    paths, tokenizer = prose
    meta = passkey.write_training_data(tokenizer, paths, tmp_path / "a", 128, 0.1, 0, "key")
    rows = list(data.pack_rows(data.document_tokens(data.discover_files(str(tmp_path / "a")), tokenizer, 0, epochs=1),
                               128))  # fmt: skip
    assert all(np.array_equal(row.position_ids, np.arange(128)) for row in rows)  # one document per row
    question = tokenizer.encode(passkey.QUESTION)
    keyed = [row for row in rows if any(np.array_equal(row.input_ids[i : i + len(question)], question)
                                        for i in range(128 - len(question)))]  # fmt: skip
    assert len(rows) == meta["book_rows"] + meta["passkey_documents"]
    assert len(keyed) == meta["passkey_documents"] == passkey.passkey_count(meta["book_rows"], 0.1) > 5
    assert abs(len(keyed) / len(rows) - 0.1) <= 1 / len(rows)
    assert all(row.input_ids[-1] == tokenizer.eos_id for row in keyed)  # the answer closes the document
    passkey.write_training_data(tokenizer, paths, tmp_path / "b", 128, 0.1, 0, "key")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    assert passkey.passkey_count(980, 0.02) == 20


def test_passkey_pretraining_row_is_the_evaluation_layout(prose):
    """A pretraining row is exactly ``length`` tokens in the evaluation documents' layout: BOS, a window of the
    stream with the needle inside it once (at depths spread over the row), the question, the answer."""
    import numpy as np

    from benchmarks.accuracy import passkey

    paths, tokenizer = prose
    stream = tokenizer.encode(paths[0].read_text())
    rng = np.random.default_rng(0)
    question = tokenizer.encode(passkey.QUESTION)
    depths = []
    for _ in range(40):
        row = passkey.pretraining_row(tokenizer.encode, stream, rng, 160, tokenizer.bos_id)
        assert row.shape == (160,) and row[0] == tokenizer.bos_id
        tail = tokenizer.decode(row[1:])
        key = tail.rsplit(" ", 1)[-1]
        assert tail.count(key) == 3 and tail.endswith(passkey.QUESTION + f" {key}")
        answer = tokenizer.encode(passkey.ANSWER.format(key=key))
        assert np.array_equal(row[len(row) - len(answer) - len(question) : len(row) - len(answer)], question)
        needle = tokenizer.encode(passkey.NEEDLE.format(key=key))
        starts = [i for i in range(1, len(row)) if np.array_equal(row[i : i + len(needle)], needle)]
        assert len(starts) == 1
        depths.append(starts[0] / (len(row) - len(needle) - len(question) - len(answer)))
    assert min(depths) < 0.2 and max(depths) > 0.8  # the needle's depth is spread, not fixed
    with pytest.raises(passkey.PasskeyError, match="no room"):
        passkey.pretraining_row(tokenizer.encode, stream, rng, 20, tokenizer.bos_id)


def test_induction_row_repeats_one_random_segment():
    """An induction row is exactly ``length`` tokens: BOS, then one segment of ids in [low, high) repeated (so every
    token after the first copy equals the token one segment earlier), segments of lengths spread from 8 to half the
    row; a row too short for two copies is refused."""
    import numpy as np

    from benchmarks.accuracy.pretrain import induction_row

    rng = np.random.default_rng(0)
    periods = []
    for _ in range(200):
        row = induction_row(rng, 101, 3, 50, 0)
        assert row.shape == (101,) and row[0] == 0
        body = row[1:]
        assert body.min() >= 3 and body.max() < 50
        # The segment's length: the smallest shift under which the body repeats (random ids may repeat by chance
        # inside a segment, so the shift found is at most the segment's length, and at least 8 but for that).
        period = next(p for p in range(1, 51) if np.array_equal(body[p:], body[:-p]))
        periods.append(period)
    assert min(periods) <= 12 and max(periods) >= 45 and all(p <= 50 for p in periods)
    row = induction_row(rng, 40, 3, 9, None)  # no BOS: the row is all segment
    assert row.shape == (40,) and row.min() >= 3
    assert any(np.array_equal(row[p:], row[:-p]) for p in range(1, 21))
    with pytest.raises(ValueError, match="no room"):
        induction_row(rng, 16, 3, 50, 0)


def test_induction_row_from_books_repeats_a_window_of_the_stream():
    """With a token stream, the repeated segment is one contiguous window of it (the text's own tokens), its
    length spread like the random segment's; a stream shorter than the segment is refused."""
    import numpy as np

    from benchmarks.accuracy.pretrain import induction_row

    rng = np.random.default_rng(1)
    books = np.arange(1000, 1500, dtype=np.int32)  # distinct ids: a window is found by its first id
    lengths = []
    for _ in range(100):
        row = induction_row(rng, 101, 3, 50, 0, books)
        assert row.shape == (101,) and row[0] == 0 and row.dtype == np.int64
        body = row[1:]
        period = next(p for p in range(8, 51) if np.array_equal(body[p:], body[:-p]))
        start = int(body[0]) - 1000
        assert np.array_equal(body[:period], books[start : start + period])  # a window of the stream, in order
        lengths.append(period)
    assert min(lengths) <= 12 and max(lengths) >= 45
    with pytest.raises(ValueError, match="holds no induction segment"):
        induction_row(rng, 101, 3, 50, 0, books[:8])


def test_recipe_refuses_pretraining_shares_that_leave_no_books():
    from benchmarks.accuracy.recipe import TINY

    assert dataclasses.replace(TINY, pretrain_passkey_rate=0.2, pretrain_induction_rate=0.5).pretrain_induction_rate
    for passkey_rate, induction_rate in ((0.5, 0.5), (0.0, 1.0), (-0.1, 0.0), (0.2, 1.2)):
        with pytest.raises(ValueError, match="pretrain_"):
            dataclasses.replace(TINY, pretrain_passkey_rate=passkey_rate, pretrain_induction_rate=induction_rate)


@pytest.mark.slow
@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/data/gutenberg")
def test_curriculum_probe_pretrains_and_measures_each_variant(tmp_path):
    """curriculum.py pretrains every variant at once and measures each: perplexity, copying loss on the first and
    later copies, passkey at the short context; a variant may be named like the corpus folder."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accuracy" / "curriculum.py"), "--recipe", "tiny", "--books",
         str(BOOKS), "--work", str(tmp_path / "work"), "--out", str(out), "--variant", "books:",
         "--variant", 'copying:pretrain_induction_rate=0.5,pretrain_passkey_rate=0,'
         'pretrain_induction_source="random"'],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.glob("curriculum-tiny-*.json")
    document = json.loads(result.read_text())
    books, copying = document["variants"]
    assert [books["name"], copying["name"]] == ["books", "copying"] and books["ok"] and copying["ok"]
    assert books["overrides"] == {}
    assert copying["overrides"] == {"pretrain_induction_rate": 0.5, "pretrain_passkey_rate": 0,
                                    "pretrain_induction_source": "random"}  # fmt: skip
    for record in (books, copying):
        assert math.isfinite(record["short_ppl"]) and record["short_ppl"] > 1
        assert 0 < record["later_copies_loss"] and 0 < record["first_copy_loss"]
        assert 0 < record["text_later_copies_loss"] and 0 < record["text_first_copy_loss"]
        assert record["passkey"]["passkey_rows"] == 2 * len(document["recipe"]["passkey_depths"])
    assert (out / result.with_suffix(".md").name).read_text().count("| copying |") == 1


def test_curriculum_variants_are_checked_before_any_work():
    from benchmarks.accuracy.curriculum import parse_variants
    from benchmarks.accuracy.recipe import TINY

    variants = parse_variants(TINY, ["a:", "b:pretrain_steps=5,pretrain_induction_rate=0.1"])
    assert variants["a"] == TINY and variants["b"].pretrain_steps == 5
    for bad in (["a:", "a:"], ["nocolon"], ["x:no_such_field=1"], ["x:pretrain_induction_rate=1.5"], ["a/b:"]):
        with pytest.raises(SystemExit, match="--variant|--set"):
            parse_variants(TINY, bad)


class _NextToken(torch.nn.Module):
    """Logits [1, s, V] (or the last ``logits_to_keep``) that put ``scale`` on the row's next token, except at the
    positions ``wrong`` counts from the end (1: the last position), where they put it on the token after it."""

    def __init__(self, wrong: set[int], vocab: int = 300, scale: float = 4.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.wrong, self.vocab, self.scale = wrong, vocab, scale

    def forward(self, input_ids, position_ids=None, use_cache=None, logits_to_keep=0):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # [1, s]
        for k in self.wrong:
            nxt[:, -k] = (nxt[:, -k] + 1) % self.vocab
        logits = self.scale * torch.nn.functional.one_hot(nxt, self.vocab).float()  # [1, s, V]
        return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()


def test_passkey_evaluation_scores_exactly_the_answer_span(tmp_path):
    """A row is right iff the argmax at every answer position is the answer's token: wrong prompt positions and the
    position after the answer do not count, a wrong first or last answer token does; the log-likelihood is the
    mean over answer tokens, by hand."""
    import math

    from lemo_ds.training.evaluate import answer_file_arg, passkey_evaluation
    from lemo_ds.training.tokenizer import ByteTokenizer

    path = tmp_path / "keys.jsonl"
    records = [{"prompt": "some text, the key is 42. The key is", "answer": " 42", "depth": depth}
               for depth in (0.1, 0.1, 0.9)]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in records))
    s, n = 1 + len(records[0]["prompt"]) + 3, 3  # [BOS] prompt answer; the answer is 3 bytes

    def evaluate(wrong):
        return passkey_evaluation(_NextToken(wrong), answer_file_arg(str(path)), ByteTokenizer(), lambda m: None)

    prompt_positions = set(range(n + 2, s + 1))  # from the end: positions that predict prompt tokens
    right = evaluate(prompt_positions | {1})
    assert right["passkey_accuracy"] == 1.0 and right["passkey_rows"] == 3
    assert right["passkey_by_depth"] == {"0.1": {"accuracy": 1.0, "answer_loglik": pytest.approx(
        right["passkey_answer_loglik"]), "rows": 2}, "0.9": {"accuracy": 1.0, "answer_loglik": pytest.approx(
        right["passkey_answer_loglik"]), "rows": 1}}  # fmt: skip
    log_z = math.log(math.exp(4.0) + 299)
    assert right["passkey_answer_loglik"] == pytest.approx(4.0 - log_z, rel=1e-5)
    for wrong in ({n + 1}, {2}):  # the first answer token, the last one
        missed = evaluate(wrong)
        assert missed["passkey_accuracy"] == 0.0
        assert missed["passkey_answer_loglik"] == pytest.approx((2 * (4.0 - log_z) - log_z) / 3, rel=1e-5)
    import argparse

    path.write_text('{"prompt": "no answer"}\n')
    with pytest.raises(argparse.ArgumentTypeError, match="keys.jsonl:1"):
        answer_file_arg(str(path))


def test_accuracy_summary_compares_each_run_with_its_own_dense(tmp_path):
    """benchmarks/accuracy/summary.py: one row per result, each gap against that result's dense run; a run missing
    from a result leaves its cell empty; both plots are written."""
    from benchmarks.accuracy import summary

    def run(name, ppl, key):
        return {"name": name, "ok": True, "eval_ppl": ppl, "passkey_accuracy": key, "passkey_answer_loglik": -key}

    first = {"runs": [run("dense", 40.0, 0.9), run("oracle@0.4+nested", 41.0, 0.8),
                      run("random@0.4+nested", 42.0, 0.5)]}  # fmt: skip
    second = {"runs": [run("dense", 50.0, 1.0), run("random@0.4+nested", 50.5, 0.7),
                       {"name": "oracle@0.4+nested", "ok": False}]}  # fmt: skip
    paths = []
    for name, document in (("a", first), ("b", second)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(document))
    assert summary.main(["--out", str(tmp_path / "s"), "--result", f"A={paths[0]}", "--result", f"B={paths[1]}"]) == 0
    text = (tmp_path / "s.md").read_text()
    assert "| A | 40.00 | +2.50% | +5.00% |" in text and "| B | 50.00 |  | +1.00% |" in text
    assert "| A | 0.90 (-0.90) | 0.80 (-0.80) | 0.50 (-0.50) |" in text
    assert "| B | 1.00 (-1.00) |  | 0.70 (-0.70) |" in text
    summary.main(["--out", str(tmp_path / "r"), "--result", f"A={paths[0]}", "--runs", "random@0.4+nested,dense"])
    assert "| reference | random@0.4+nested | dense |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "s-perplexity.png").is_file() and (tmp_path / "s-passkey.png").is_file()
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        summary.main(["--out", str(tmp_path / "t"), "--result", "no-such-file"])


def test_accuracy_summary_plots_passkey_accuracy_with_binomial_errors(tmp_path):
    """--passkey-metric accuracy: the passkey plot shows the accuracy, each bar with its binomial standard error
    sqrt(p (1 - p) / rows); a run without a row count gets none."""
    from benchmarks.accuracy import summary

    document = {"runs": [
        {"name": "dense", "ok": True, "eval_ppl": 40.0, "passkey_accuracy": 0.2, "passkey_rows": 300,
         "passkey_answer_loglik": -1.0},
        {"name": "random@0.4+nested", "ok": True, "eval_ppl": 41.0, "passkey_accuracy": 0.5, "passkey_rows": 100,
         "passkey_answer_loglik": -1.2},
        {"name": "oracle@0.4+nested", "ok": True, "eval_ppl": 41.0, "passkey_accuracy": 0.5,
         "passkey_answer_loglik": -1.2},
    ]}  # fmt: skip
    errors = summary.accuracy_error(document, ["dense", "random@0.4+nested", "oracle@0.4+nested"])
    assert errors == {"dense": pytest.approx((0.2 * 0.8 / 300) ** 0.5), "random@0.4+nested": pytest.approx(0.05)}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document))
    assert summary.main(["--out", str(tmp_path / "s"), "--result", f"D={path}", "--passkey-metric", "accuracy"]) == 0
    assert (tmp_path / "s-passkey.png").stat().st_size > 0


def test_only_refuses_a_run_the_recipe_does_not_have(tmp_path, capsys):
    """--only with a name that is not a run of the recipe (a typo, or a mode's run that recipe.runs does not list)
    stops before any work, naming it and the runs there are; nothing is written."""
    from benchmarks.accuracy import run

    code = run.main(["--recipe", "tiny", "--books", str(tmp_path / "no-books"), "--work", str(tmp_path / "work"),
                     "--out", str(tmp_path / "out"), "--only", "dense,oracle@0.4+nestd"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "--only names no run of this recipe: oracle@0.4+nestd" in error and "predictor@0.4+nested" in error
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_experiment_scripts_parse():
    """Every ablation script under benchmarks/accuracy/experiments is valid bash (they run only on the H200)."""
    scripts = sorted((REPO / "benchmarks" / "accuracy" / "experiments").glob("*.sh"))
    assert any(script.name == "retrieval.sh" for script in scripts)
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name}: {done.stderr}"
