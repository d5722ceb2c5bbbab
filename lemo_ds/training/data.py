"""Training data: text files -> documents -> packed fixed-length rows -> this rank's micro-batches.

Sources (``--data``): a text file (one document), a ``.jsonl`` file (one document per line, in its "text"
field), or a folder (every ``*.txt``, ``*.py``, ``*.md`` and ``*.jsonl`` below it). Without ``--data`` the
corpus is the running interpreter's own standard library (its ``.py`` files, site-packages excluded): real
text found on every machine, no download.

Packing: documents are tokenized as ``[BOS] text [EOS]`` (each special token only if the tokenizer has one)
and concatenated into rows of exactly ``seq_len`` tokens; a document that does not fit continues at the
start of the next row. ``position_ids`` restart at 0 at every document start and at every row start, which
is also how Hugging Face models detect packed sequences (a position that is not the previous one plus one
opens a new sequence in the attention mask). ``labels`` are the input ids with -100 wherever the position
is 0, so no token is trained to predict the first token of another document.

Order: an endless sequence of epochs; epoch ``e`` visits the files in an order drawn from ``(seed, e)``
and the documents of a ``.jsonl`` file in an order drawn from ``(seed, e, file index)``. Rows are a
function of the corpus, the tokenizer, ``seq_len`` and the seed only (not of the world size), so global
row ``i`` is the same row in every run, and a resumed run skips the rows already consumed.

Sharding: micro-step ``m`` consumes ``world_size * micro_batch`` consecutive rows; rank ``r`` takes the
``r``-th ``micro_batch`` of them.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from lemo_ds.memory.segment_loss import IGNORE_INDEX
from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.text_check import not_text_reason
from lemo_ds.training.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def discover_files(data: str | None, flag: str = "--data") -> list[Path]:
    """The corpus files of ``--data`` (None: the standard library), sorted so every rank sees one list; errors
    name ``flag``."""
    if data is None:
        root = stdlib_dir()
        files = _walk(root, (".py",), prune=_NOT_STDLIB)
        if not files:
            raise TrainingSetupError(f"no .py files found in the Python standard library at {root}; pass --data")
        return sorted(files)
    path = Path(data)
    if not path.exists():
        raise TrainingSetupError(
            f'{flag} {data}: no such file or folder; give a text file, a .jsonl file with a "text" field, '
            "or a folder of *.txt/*.py/*.md/*.jsonl files (or leave --data out to train on the Python stdlib)"
        )
    if path.is_dir():
        files = _walk(path, TEXT_SUFFIXES)
        if not files:
            raise TrainingSetupError(
                f"{flag} {data}: the folder holds no {'/'.join('*' + s for s in TEXT_SUFFIXES)} files; "
                f"add text files or point {flag} elsewhere"
            )
        return files
    return [path]


def _walk(root: Path, suffixes: tuple[str, ...], prune: tuple[str, ...] = ()) -> list[Path]:
    """Files below ``root`` with one of ``suffixes``, sorted; folders named in ``prune`` are not entered
    (os.walk rather than rglob so that site-packages is never walked at all)."""
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in prune]
        found.extend(Path(folder, n) for n in names if n.endswith(suffixes))
    return sorted(found)


def describe_corpus(data: str | None, files: list[Path]) -> str:
    where = f"the Python standard library at {stdlib_dir()}" if data is None else data
    return f"{len(files)} file{'s' if len(files) != 1 else ''} from {where}"


def jsonl_records(path: Path | str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a .jsonl file; a line that is not JSON is a ValueError
    naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None


def read_documents(path: Path, rng: np.random.Generator | None = None) -> list[str]:
    """The documents of one file: the whole file, or the "text" of every line of a .jsonl file (shuffled
    by ``rng`` when given)."""
    if path.suffix != ".jsonl":
        return [path.read_bytes().decode("utf-8", errors="replace")]
    docs = []
    try:
        records = list(jsonl_records(path))
    except ValueError as error:
        raise TrainingSetupError(f"--data {error}") from None
    for line_no, record in records:
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TrainingSetupError(
                f'--data {path}:{line_no}: every .jsonl line must be an object with a string "text" field'
            )
        docs.append(text)
    if rng is not None:
        order = rng.permutation(len(docs))
        docs = [docs[i] for i in order]
    return docs


def document_tokens(
    files: list[Path], tokenizer: Tokenizer, seed: int, epochs: int | None = None
) -> Iterator[np.ndarray]:
    """Stream of tokenized documents ``[BOS] ids [EOS]``, epoch after epoch (endless when ``epochs`` is None):
    [n_i] int64 each."""
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    suffix = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = np.random.default_rng([seed, epoch])
        for file_index in rng.permutation(len(files)):
            doc_rng = np.random.default_rng([seed, epoch, int(file_index)])
            for text in read_documents(files[file_index], doc_rng):
                ids = tokenizer.encode(text)
                if len(ids):
                    yield np.concatenate([np.asarray(prefix, np.int64), ids, np.asarray(suffix, np.int64)])
        epoch += 1


def check_corpus(
    files: list[Path], tokenizer: Tokenizer, seq_len: int, data: str | None, flag: str = "--data"
) -> None:
    """Fail early (before any collective) unless every file is text and one pass over the corpus fills at least
    one row. The default corpus (the stdlib, ``data`` None) is not checked for text: some of its test files hold
    deliberately odd bytes."""
    if data is not None:
        for path in files:
            reason = not_text_reason(path)
            if reason is not None:
                raise TrainingSetupError(f"{flag} {path}: not text: {reason}; remove it from {flag} or convert it")
    specials = (tokenizer.bos_id is not None) + (tokenizer.eos_id is not None)
    total = 0
    for path in files:
        for text in read_documents(path):
            ids = tokenizer.encode(text)
            total += len(ids) + specials if len(ids) else 0
            if total >= seq_len:
                return
    where = data if data is not None else str(stdlib_dir())
    if total == 0:
        raise TrainingSetupError(f"{flag} {where}: the corpus holds no text; add documents or point {flag} elsewhere")
    raise TrainingSetupError(
        f"{flag} {where}: the corpus holds {total} tokens, fewer than one sequence of --seq-len {seq_len}; "
        f"add text or lower --seq-len"
    )


@dataclass(frozen=True)
class Row:
    input_ids: np.ndarray  # [s] int64
    labels: np.ndarray  # [s] int64, -100 where position_ids == 0
    position_ids: np.ndarray  # [s] int64, 0 at every document (and row) start


def pack_rows(documents: Iterable[np.ndarray], seq_len: int) -> Iterator[Row]:
    """Concatenate documents into rows of exactly ``seq_len`` tokens (the last partial row is never
    emitted; with an endless document stream there is none)."""
    ids = np.empty(seq_len, np.int64)  # [s]
    pos = np.empty(seq_len, np.int64)  # [s]
    fill = 0
    for doc in documents:
        start = 0
        while start < len(doc):
            take = min(seq_len - fill, len(doc) - start)
            ids[fill : fill + take] = doc[start : start + take]
            pos[fill : fill + take] = np.arange(take)
            fill += take
            start += take
            if fill == seq_len:
                labels = ids.copy()
                labels[pos == 0] = IGNORE_INDEX
                yield Row(ids.copy(), labels, pos.copy())
                fill = 0


def packed_rows(files: list[Path], tokenizer: Tokenizer, seq_len: int, seed: int, start: int = 0) -> Iterator[Row]:
    """Global rows ``start, start + 1, ...`` of the corpus (identical on every rank and in every run)."""
    return islice(pack_rows(document_tokens(files, tokenizer, seed), seq_len), start, None)


def heldout_rows(files: list[Path], tokenizer: Tokenizer, seq_len: int, seed: int, limit: int) -> Iterator[Row]:
    """At most ``limit`` rows of one pass over a held-out corpus (never a row twice; identical on every rank)."""
    return islice(pack_rows(document_tokens(files, tokenizer, seed, epochs=1), seq_len), limit)


def rank_batches(
    rows: Iterable[Row], *, rank: int, world_size: int, micro_batch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches: each group of ``world_size * micro_batch`` rows feeds one micro-step of all
    ranks; rank ``r`` takes rows ``[r * micro_batch, (r + 1) * micro_batch)`` of the group."""
    group = world_size * micro_batch
    iterator = iter(rows)
    while True:
        chunk = list(islice(iterator, group))
        if len(chunk) < group:
            return
        mine = chunk[rank * micro_batch : (rank + 1) * micro_batch]
        yield {
            "input_ids": torch.from_numpy(np.stack([r.input_ids for r in mine])),  # [b, s]
            "labels": torch.from_numpy(np.stack([r.labels for r in mine])),  # [b, s]
            "position_ids": torch.from_numpy(np.stack([r.position_ids for r in mine])),  # [b, s]
        }
