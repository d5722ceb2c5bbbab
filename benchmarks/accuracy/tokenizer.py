"""A byte-level BPE tokenizer trained on the train books only (HF ``tokenizers``), saved as a transformers
``PreTrainedTokenizerFast`` beside the model so that ``launch/train.py --model DIR`` loads it."""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(books: list[Path], vocab_size: int):
    """A fast tokenizer with ``vocab_size`` ids (the three special tokens first: <s> 0, </s> 1, <pad> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token
        show_progress=False,
    )
    core.train_from_iterator((path.read_text(encoding="utf-8") for path in books), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
