"""Tokenizers for the training job: a byte-level one for the presets, a thin adapter for Hugging Face ones.

``ByteTokenizer`` maps UTF-8 bytes to ids 0..255 and adds three special ids: BOS 256, EOS 257, PAD 258. It
needs no training and no files, is deterministic on every machine and tokenizes at memory speed, which is
all a preset model built with random weights needs (the preset models' vocabularies hold these 259 ids;
the real-shape presets keep their real vocabulary size and simply use its first 259 ids).

A model directory brings its own tokenizer (``AutoTokenizer.from_pretrained(..., local_files_only=True)``);
``HFTokenizer`` gives it the same small interface.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from lemo_ds.training.errors import TrainingSetupError


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without special tokens: [n] int64."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255) plus BOS/EOS/PAD; no files, no training, no randomness."""

    BOS, EOS, PAD = 256, 257, 258
    bos_id: int | None = BOS
    eos_id: int | None = EOS
    pad_id: int | None = PAD
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        # "replace": a lone surrogate (possible in JSON strings) becomes "?" instead of an error.
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer seen through the ``Tokenizer`` interface."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def load_hf_tokenizer(model_dir: str | os.PathLike) -> HFTokenizer:
    """The tokenizer stored in a model directory (local files only: the job never downloads)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise TrainingSetupError(
            f"--model {model_dir}: no usable tokenizer in that directory ({_first_line(error)}); "
            "save one there with tokenizer.save_pretrained(DIR), or train a preset (e.g. --model tiny-llama)"
        ) from None
    return HFTokenizer(tokenizer)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
