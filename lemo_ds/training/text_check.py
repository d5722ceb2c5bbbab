"""Is a --data file text at all? Random bytes, an image or a model file would otherwise decode (errors
replaced) into a "corpus" and train without a word of warning.

Only the head of each file is read (``SAMPLE_BYTES``), so a large corpus costs one small read per file. Text
is UTF-8 that decodes with at most ``MAX_BAD_SHARE`` of its characters undecodable or control characters
(tab, newline, carriage return, form feed and vertical tab are text). Random bytes score about 0.5.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_BYTES = 64 * 1024
MAX_BAD_SHARE = 0.01
_TEXT_CONTROLS = frozenset("\t\n\r\f\v")


def bad_share(raw: bytes) -> float:
    """Share of the characters of ``raw`` that are undecodable UTF-8 or control characters."""
    if not raw:
        return 0.0
    text = raw.decode("utf-8", errors="replace")
    if len(raw) == SAMPLE_BYTES:  # the sample may end inside a character: that one does not count
        text = text[:-1]
    bad = sum(1 for char in text if char == "\ufffd" or (char < " " and char not in _TEXT_CONTROLS) or char == "\x7f")
    return bad / max(len(text), 1)


def not_text_reason(path: Path) -> str | None:
    """Why ``path`` is not text (None: it is)."""
    with open(path, "rb") as handle:
        raw = handle.read(SAMPLE_BYTES)
    share = bad_share(raw)
    if share > MAX_BAD_SHARE:
        return (
            f"{share:.0%} of the first {len(raw):,} bytes are not UTF-8 text (undecodable bytes or control "
            f"characters; at most {MAX_BAD_SHARE:.0%} allowed)"
        )
    return None
