"""The books: Project Gutenberg header and licence stripped, split by whole book into train and held-out.

A book is one document; no book contributes to both sides, so held-out perplexity measures text the model never
saw. The split is a pure function of the file names (every ``heldout_every``-th book in name order), the same on
every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The markers vary between books: "*** START OF THIS PROJECT GUTENBERG EBOOK X ***", "***START OF THE PROJECT...".
_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.IGNORECASE | re.MULTILINE)


class CorpusError(ValueError):
    """A book without the Gutenberg markers, or a source folder without books."""


def strip_gutenberg(text: str, name: str = "the text") -> str:
    """The book between the '*** START OF' and '*** END OF' lines, with Unix line endings."""
    text = text.replace("\r\n", "\n")
    start, end = _START.search(text), _END.search(text)
    if start is None or end is None or end.start() <= start.end():
        raise CorpusError(
            f"{name}: no '*** START OF ... PROJECT GUTENBERG EBOOK' line followed by an '*** END OF' line; "
            "give Project Gutenberg plain-text books as distributed (with header and licence)"
        )
    return text[start.end() : end.start()].strip() + "\n"


@dataclass(frozen=True)
class Split:
    train: list[Path]  # the stripped train books
    heldout: list[Path]  # the stripped held-out books


def prepare(source: Path, out: Path, heldout_every: int, limit: int | None = None) -> Split:
    """Strip every book of ``source`` (``pg*.txt``) into ``out/train`` and ``out/heldout``; book ``i`` (in name
    order) is held out when ``i % heldout_every == heldout_every - 1``. ``limit``: use only the first books."""
    books = sorted(source.glob("pg*.txt"))[:limit]
    if len(books) < heldout_every:
        raise CorpusError(
            f"{source}: {len(books)} books (pg*.txt), fewer than heldout_every={heldout_every}; "
            "point --books at the Gutenberg folder (../shared/data/gutenberg)"
        )
    split = Split([], [])
    for index, book in enumerate(books):
        side = "heldout" if index % heldout_every == heldout_every - 1 else "train"
        target = out / side / book.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            body = strip_gutenberg(book.read_bytes().decode("utf-8", errors="replace"), book.name)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(body, encoding="utf-8")
            tmp.replace(target)
        getattr(split, side).append(target)
    return split
