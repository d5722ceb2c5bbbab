"""Run by tests/test_train_units.py in a process of its own: one-rank ZeRO-3 engines (bf16) over a tiny Llama built
in zero.Init with peft LoRA added as launch/train.py adds it, with and without add_lora's dtype. Prints one JSON
line: {dtype given: [adapter dtype in the engine, optimizer master dtype, adapters moved after two steps]}."""

from __future__ import annotations

import json

import deepspeed
import torch
from one_rank_group import start_one_rank_group
from tiny_models import VOCAB, tiny_config
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from lemo_ds.training import model as model_building

CONFIG = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}  # fmt: skip


def one_engine(dtype: torch.dtype | None) -> list:
    keep = HfDeepSpeedConfig(CONFIG)  # noqa: F841 (alive while building: from_config runs in zero.Init, as in train.py)
    net = AutoModelForCausalLM.from_config(tiny_config("llama", 2, "sdpa", pad_token_id=None), dtype=torch.bfloat16)
    assert all(hasattr(p, "ds_id") for p in net.parameters())
    net = model_building.add_lora(net, 4, seed=0, dtype=dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    engine, optimizer, *_ = deepspeed.initialize(model=net, model_parameters=params, config=CONFIG)
    adapters = {n: p for n, p in engine.module.named_parameters() if "lora_" in n}
    dtypes = {str(p.dtype).removeprefix("torch.") for p in adapters.values()}
    masters = {str(g.dtype).removeprefix("torch.") for g in optimizer.fp32_partitioned_groups_flat}
    before = {n: p.ds_tensor.detach().clone() for n, p in adapters.items()}
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # lora_B starts at zero: lora_A moves from the second step on
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    moved = all(not torch.equal(before[n], p.ds_tensor) for n, p in adapters.items())
    engine.destroy()
    return ["/".join(sorted(dtypes)), "/".join(sorted(masters)), moved]


def main() -> None:
    start_one_rank_group(29700)
    found = {str(d).removeprefix("torch."): one_engine(d) for d in (None, torch.bfloat16)}
    print(json.dumps(found))


if __name__ == "__main__":
    main()
