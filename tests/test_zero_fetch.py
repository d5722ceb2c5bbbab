"""lemo_ds.zero_fetch: ZeRO-3 on one rank fetches parameters without DeepSpeed's stream synchronisation where the
partition is the parameter's own data, keeps DeepSpeed's wait where a copy was made, and trains exactly as before."""

from __future__ import annotations

import copy
import sys

import torch
from one_rank_group import start_one_rank_group
from tiny_models import VOCAB, tiny_model

import lemo_ds
from lemo_ds.zero_fetch import _gathered_in_place


def test_one_rank_zero3_skips_the_sync_and_trains_the_same(monkeypatch):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    start_one_rank_group(29900)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
    # No padding id: Hugging Face's init zeroes the padding row, which a partitioned embedding does not have.
    reference = tiny_model("llama", layers=2, dtype=torch.float32, pad_token_id=None)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = tiny_model("llama", layers=2, dtype=torch.float32, pad_token_id=None)
    with torch.no_grad():
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            with deepspeed.zero.GatheredParameters([ours], modifier_rank=0):
                ours.copy_(theirs)
    section = {"keep_ratio": 0.5, "block_size": 8, "scorer": "random", "fused_ops": "off"}
    engine, *_ = lemo_ds.initialize(model=model, model_parameters=model.parameters(),
                                    config={**config, "lemo": section})  # fmt: skip
    lemo_ds.apply_lemo(reference, copy.deepcopy(section))
    # DeepSpeed's own NoGather wait asks the accelerator whether to synchronise: count the asks made from it.
    accelerator = get_accelerator()
    calls = []
    real = accelerator.resolves_data_dependency

    def asked():
        caller = sys._getframe(1).f_code
        if caller.co_name == "wait" and caller.co_filename.endswith("partition_parameters.py"):
            calls.append(caller)
        return real()

    monkeypatch.setattr(accelerator, "resolves_data_dependency", asked)
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    assert calls == []  # every fetch of the step was in place: DeepSpeed's synchronising wait never ran
    expected = reference(input_ids=ids, labels=ids).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    from deepspeed.utils import safe_get_full_grad

    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(safe_get_full_grad(ours), theirs.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_copied_partition_keeps_deepspeeds_wait():
    class Param:  # what the check reads of a ZeRO-3 parameter
        pass

    partition = torch.randn(6)
    copied, aliased = Param(), Param()
    copied.ds_tensor, copied.data = partition, partition.clone()
    aliased.ds_tensor, aliased.data = partition, partition.view(2, 3)
    assert not _gathered_in_place(copied)
    assert _gathered_in_place(aliased)
    quantized = Param()
    quantized.ds_tensor, quantized.data = partition, partition
    partition.ds_quant_scale = torch.ones(1)
    assert not _gathered_in_place(quantized)
