"""Passkey retrieval at the extended context: a number stated once at some depth of book text, asked for at the end.

Fine-tuning data (``recipe.passkey_rate`` > 0): the fine-tuning books, each trimmed to a whole number of rows, and
passkey documents of exactly one row each, so that launch/train.py's packing (documents concatenated into rows)
puts every passkey document alone in its row, the needle and the question in one context. ``passkey_rate`` is the
share of rows that are passkey documents. Every document is a file of the data folder; launch/train.py visits the
files in a seeded random order, which spreads the passkey rows among the books.

Evaluation (``recipe.passkey_rows`` per depth): rows of exactly ``long_seq`` tokens from the held-out books with
the needle after ``depth`` of the haystack, written as ``{"prompt", "answer", "depth"}`` records for
``launch/train.py --eval-passkey`` (dense, teacher-forced: a row is right when the argmax of every answer token is
right; lemo_ds.training.evaluate.passkey_evaluation).

Exact token counts: a document's text is cut from a book between token starts and joined with the needle and the
question; it is kept only when tokenizing the joined text gives exactly the pieces' tokens in order (a cut inside
a word or a merge across a join would change them), so positions and lengths are known, not estimated.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEEDLE = " The pass code is {key}. Remember it: {key} is the pass code."
QUESTION = " What is the pass code? The pass code is"
ANSWER = " {key}"
META = "lemo_passkey.json"  # not a data file for launch/train.py (it reads *.txt, *.py, *.md, *.jsonl)
_TRIES = 64  # random haystack windows tried before giving up on one document
_EDGE = 64  # tokens checked at each end of a trimmed book


class PasskeyError(ValueError):
    """No document of the asked length could be built from the books."""


@dataclass(frozen=True)
class Book:
    text: str
    ids: np.ndarray  # [n] int64, the text's tokens
    starts: np.ndarray  # [n + 1] int64, character offset where each token starts (last: len(text))

    def cut(self, first: int, stop: int) -> str:
        """The text of tokens ``first .. stop - 1``."""
        return self.text[self.starts[first] : self.starts[stop]]


def tokenize(tokenizer, texts: list[str]) -> list[Book]:
    """``tokenizer``: lemo_ds's HFTokenizer (the one launch/train.py loads from the model directory)."""
    # The Rust tokenizer itself, batched over the cores (transformers' wrapper adds seconds converting offsets).
    encoded = tokenizer.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    books = []
    for text, encoding in zip(texts, encoded, strict=True):
        starts = np.append(np.asarray(encoding.offsets, np.int64).reshape(-1, 2)[:, 0], len(text))
        books.append(Book(text, np.asarray(encoding.ids, np.int64), starts))
    return books


def specials(tokenizer) -> tuple[int, int]:
    """(tokens launch/train.py puts before a document, after it): BOS and EOS where the tokenizer has them."""
    return int(tokenizer.bos_id is not None), int(tokenizer.eos_id is not None)


@dataclass(frozen=True)
class Passkey:
    prompt: str  # haystack with the needle inside, then the question
    answer: str
    depth: float  # the needle follows round(depth * haystack tokens) haystack tokens
    needle_token: int  # index of the needle's first token in the prompt's tokens
    haystack_tokens: int
    key: int


def make_passkey(tokenizer, text: str, rng: np.random.Generator, depth: float, tokens: int) -> Passkey:
    """A passkey document whose prompt and answer are exactly ``tokens`` tokens together, its haystack a random
    window of the book ``text``."""
    key = int(rng.integers(10_000, 100_000))
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question, answer = tokenizer.encode(QUESTION), tokenizer.encode(ANSWER.format(key=key))
    haystack = tokens - len(needle) - len(question) - len(answer)
    if haystack < 1:
        raise PasskeyError(f"{tokens} tokens leave no room for a haystack beside the needle and the question")
    before = round(depth * haystack)
    # Only a window of the book is tokenized (whole books take seconds): 8 characters per token is more than a
    # byte-level BPE token spans on English prose.
    chars = 8 * (haystack + 16)
    for _ in range(_TRIES):
        start = int(rng.integers(0, max(len(text) - chars, 0) + 1))
        (window,) = tokenize(tokenizer, [text[start : start + chars]])
        if len(window.ids) < haystack + 2:
            raise PasskeyError(f"a book of {len(text)} characters holds no haystack of {haystack} tokens")
        first = int(rng.integers(1, len(window.ids) - haystack))  # token 0 may be the end of a word cut in two
        middle, stop = first + before, first + haystack
        prompt = window.cut(first, middle) + NEEDLE.format(key=key) + window.cut(middle, stop) + QUESTION
        expected = np.concatenate([window.ids[first:middle], needle, window.ids[middle:stop], question])
        # Both checks: the evaluation tokenizes prompt and answer apart, the training job the whole document.
        if np.array_equal(tokenizer.encode(prompt), expected) and np.array_equal(
            tokenizer.encode(prompt + ANSWER.format(key=key)), np.concatenate([expected, answer])
        ):
            return Passkey(prompt, ANSWER.format(key=key), depth, before, haystack, key)
    raise PasskeyError(f"no haystack window of {haystack} tokens tokenizes apart from the needle in {_TRIES} tries")


def pretraining_row(encode, stream: np.ndarray, rng: np.random.Generator, length: int,
                    bos_id: int | None) -> np.ndarray:  # fmt: skip
    """One pretraining row of exactly ``length`` tokens holding a passkey document: [BOS] haystack with the needle at
    a uniform random depth, the question, the answer: [length]. ``encode``: text -> token ids; the haystack is a
    random window of the token ``stream`` (the pretraining books). Built by joining the pieces' own tokens, which
    is what the evaluation's rows tokenize to (make_passkey keeps only such rows); the pretraining does not need
    the text."""
    key = int(rng.integers(10_000, 100_000))
    needle, question, answer = (np.asarray(encode(text), stream.dtype)
                                for text in (NEEDLE.format(key=key), QUESTION, ANSWER.format(key=key)))  # fmt: skip
    head = np.asarray([bos_id] if bos_id is not None else [], stream.dtype)
    haystack = length - len(head) - len(needle) - len(question) - len(answer)
    if haystack < 1 or len(stream) <= haystack:
        raise PasskeyError(f"{length} tokens leave no room for a haystack beside the needle and the question")
    start = int(rng.integers(0, len(stream) - haystack))
    window = stream[start : start + haystack]  # [haystack]
    before = int(rng.integers(0, haystack + 1))
    return np.concatenate([head, window[:before], needle, window[before:], question, answer])  # [length]


def trim(tokenizer, books: list[Book], row_tokens: int) -> list[tuple[str, int]]:
    """(text, rows) per book: the book cut to a whole number of rows of ``row_tokens`` once launch/train.py adds
    its special tokens; ("", 0) for a book shorter than a row."""
    before, after = specials(tokenizer)
    trimmed = []
    for book in books:
        rows = (len(book.ids) + before + after) // row_tokens
        keep = rows * row_tokens - before - after
        if rows == 0:
            trimmed.append(("", 0))
            continue
        # Cut where the text's tokens stay the book's: checked on a window at each end (tokenization is local:
        # pieces between whitespace are tokenized apart). The leftover (under a row) allows starting later.
        for first in range(len(book.ids) - keep + 1):
            stop = first + keep
            head, tail = min(first + _EDGE, stop), max(stop - _EDGE, first)
            if np.array_equal(tokenizer.encode(book.cut(first, head)), book.ids[first:head]) and np.array_equal(
                tokenizer.encode(book.cut(tail, stop)), book.ids[tail:stop]
            ):
                trimmed.append((book.cut(first, stop), rows))
                break
        else:
            raise PasskeyError(f"no cut of {keep} tokens of a book tokenizes back to itself")
    return trimmed


def _weights(texts: list[str]) -> np.ndarray:
    """Haystacks come from a book with probability proportional to its length: [books]."""
    lengths = np.asarray([len(text) for text in texts], np.float64)
    return lengths / lengths.sum()


def passkey_count(rows: int, rate: float) -> int:
    """Passkey documents that make ``rate`` of all rows when the books fill ``rows``."""
    return round(rate * rows / (1.0 - rate))


def write_training_data(tokenizer, paths: list[Path], folder: Path, row_tokens: int, rate: float, seed: int,
                        key: str) -> dict:  # fmt: skip
    """The fine-tuning folder: the trimmed books (their names) and passkey-NNNNN.txt documents of one row each.
    Kept as it is when its META file holds the same ``key`` (the tokenizer, the books and these settings).
    Returns the META record (rows of books, passkey documents, their share)."""
    meta_path = folder / META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return json.loads(meta_path.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    books = tokenize(tokenizer, [path.read_text(encoding="utf-8") for path in paths])
    book_rows = 0
    for path, (text, rows) in zip(paths, trim(tokenizer, books, row_tokens), strict=True):
        if rows:
            (folder / path.name).write_text(text, encoding="utf-8")
            book_rows += rows
    count = passkey_count(book_rows, rate)
    rng = np.random.default_rng([seed, 0])
    before, after = specials(tokenizer)
    texts = [book.text for book in books]
    weights = _weights(texts)
    for index in range(count):
        text = texts[rng.choice(len(texts), p=weights)]
        passkey = make_passkey(tokenizer, text, rng, float(rng.random()), row_tokens - before - after)
        (folder / f"passkey-{index:05d}.txt").write_text(passkey.prompt + passkey.answer, encoding="utf-8")
    meta = {"key": key, "book_rows": book_rows, "passkey_documents": count,
            "passkey_share": count / max(book_rows + count, 1)}  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def write_eval_file(tokenizer, paths: list[Path], out: Path, row_tokens: int, depths: tuple[float, ...],
                    per_depth: int, seed: int) -> Path:  # fmt: skip
    """``per_depth`` held-out rows of exactly ``row_tokens`` tokens ([BOS] prompt answer) at each depth, as
    ``--eval-passkey`` records."""
    texts = [path.read_text(encoding="utf-8") for path in paths]
    rng = np.random.default_rng([seed, 1])  # not the training documents' stream
    weights = _weights(texts)
    before, _ = specials(tokenizer)
    lines = []
    for depth in depths:
        for _ in range(per_depth):
            text = texts[rng.choice(len(texts), p=weights)]
            passkey = make_passkey(tokenizer, text, rng, depth, row_tokens - before)
            lines.append(json.dumps({"prompt": passkey.prompt, "answer": passkey.answer, "depth": depth,
                                     "key": passkey.key}))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def evaluate_model(model_dir: Path, path: Path, device) -> dict:
    """The passkey evaluation of a model directory as it is (the extended model before fine-tuning), with the code
    and the rows of launch/train.py --eval-passkey."""
    import torch
    from transformers import AutoModelForCausalLM

    from lemo_ds.training import evaluate
    from lemo_ds.training.tokenizer import load_hf_tokenizer

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    result = evaluate.passkey_evaluation(model, str(path), load_hf_tokenizer(model_dir), lambda message: None)
    del model
    return result


def data_key(reference_key: str, paths: list[Path], row_tokens: int, rate: float, seed: int) -> str:
    """What the training folder depends on (the reference key covers the tokenizer's training)."""
    blob = json.dumps([reference_key, [p.name for p in paths], row_tokens, rate, seed, NEEDLE, QUESTION, ANSWER])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
