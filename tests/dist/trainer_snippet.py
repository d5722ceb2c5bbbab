"""The README's Hugging Face Trainer snippet as a user writes it (issue 32): ``TrainingArguments(...,
deepspeed="ds_configs/zero3_lemo.json")`` with arguments of its own (batch size, learning rate, betas, clipping,
warm-up: none of them the config's old numbers), ``enable(trainer)``, a checkpoint every 2 steps. Run by
tests/test_user_table.py through the deepspeed launcher; its report: the Trainer's log history and the DeepSpeed
config the Trainer filled in.

    deepspeed --num_gpus 1 tests/dist/trainer_snippet.py OUTPUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _engine import write_report
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from lemo_ds.integrations.transformers import enable

REPO = Path(__file__).resolve().parents[2]
SEQ = 256  # 4 blocks of 64: the sparse layers keep 2
ARGUMENTS = dict(per_device_train_batch_size=2, learning_rate=5e-5, adam_beta2=0.98, weight_decay=0.01,
                 max_grad_norm=0.5, warmup_steps=1)  # fmt: skip


class Rows(torch.utils.data.Dataset):
    def __init__(self, count: int, vocab: int) -> None:
        self.ids = torch.randint(1, vocab, (count, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # set by the launcher
    out = parser.parse_args().out
    args = TrainingArguments(output_dir=str(out), deepspeed=str(REPO / "ds_configs" / "zero3_lemo.json"), max_steps=2,
                             save_steps=2, logging_steps=1, report_to="none", disable_tqdm=True, seed=0,
                             **ARGUMENTS)  # fmt: skip
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # under ZeRO-3: partitioned
    trainer = enable(Trainer(model=model, args=args, train_dataset=Rows(8, config.vocab_size)))
    trainer.train()
    filled = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    write_report({"rank": torch.distributed.get_rank(), "log_history": trainer.state.log_history,
                  "optimizer": filled["optimizer"]["params"], "scheduler": filled["scheduler"]["params"],
                  "micro_batch": filled["train_micro_batch_size_per_gpu"],
                  "gradient_clipping": filled["gradient_clipping"]})  # fmt: skip


if __name__ == "__main__":
    main()
