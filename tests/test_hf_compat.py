"""lemo_ds.hf_compat against the installed transformers (CI runs the suite on the oldest supported and on the newest
release, so each side of every difference is checked by one of the two runs)."""

from __future__ import annotations

import inspect

import torch
from tiny_models import VOCAB, tiny_model
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

import lemo_ds
from lemo_ds.hf_compat import CACHE_KWARGS, cache_argument


def test_the_installed_release_names_its_cache_with_one_of_the_known_keywords():
    for function in (LlamaDecoderLayer.forward, LlamaModel.forward):
        parameters = inspect.signature(inspect.unwrap(function)).parameters
        assert any(name in parameters for name in CACHE_KWARGS), list(parameters)


def test_cache_argument_reads_either_keyword():
    cache = object()
    assert cache_argument({"cache": cache}) is cache
    assert cache_argument({"past_key_values": cache}) is cache
    assert cache_argument({"past_key_values": None, "use_cache": True}) is None


def test_segment_loss_output_carries_the_cache_field_of_the_installed_release():
    model = lemo_ds.apply_lemo(tiny_model("llama"), {"keep_ratio": 1.0})
    ids = torch.randint(1, VOCAB, (1, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)
    assert "cache" in out.__dataclass_fields__ or "past_key_values" in out.__dataclass_fields__


def test_segment_loss_output_reads_the_cache_without_a_deprecation_warning():
    # transformers 5.24 logs "`past_key_values`/`cache_params` are deprecated" (once per process, through its
    # logger) at any read of the old name: the output must read only the installed release's name.
    import logging

    from transformers.utils import logging as hf_logging

    logging.Logger.warning_once.cache_clear()  # an earlier read in this process must not hide this one's
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library = hf_logging.get_logger("transformers")  # its handlers see every transformers module's records
    library.addHandler(handler)
    try:
        model = lemo_ds.apply_lemo(tiny_model("llama"), {"keep_ratio": 1.0})
        ids = torch.randint(1, VOCAB, (1, 16))
        model(input_ids=ids, labels=ids)
    finally:
        library.removeHandler(handler)
    assert not [record for record in records if "deprecated" in record.getMessage()], records


def test_trainer_checkpointing_arguments_name_the_installed_releases_fields(tmp_path):
    import warnings

    from transformers import TrainingArguments

    from lemo_ds.hf_compat import trainer_checkpointing_arguments

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # 5.24 deprecates the old names with a FutureWarning
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                 **trainer_checkpointing_arguments(use_reentrant=False))  # fmt: skip
    flag = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert flag is True
