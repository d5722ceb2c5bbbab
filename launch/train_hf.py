"""launch/train.py's job through the Hugging Face Trainer, with lemo_ds turned on in one line.

Run from the repository root:

    # the default: tiny Llama preset (random init), the Python stdlib as text, ZeRO-3 + LeMo (40% of blocks
    # kept in the deeper layers), LoRA r=8, 20 steps of 1024 tokens
    deepspeed launch/train_hf.py --deepspeed ds_configs/zero3_lemo.json

    # two ranks (CPU ranks over gloo when there is no GPU), 3 steps of 256 tokens, Hugging Face checkpointing
    deepspeed --num_gpus 2 launch/train_hf.py --deepspeed ds_configs/zero3_lemo.json --max-steps 3 --seq-len 256 \
        --grad-ckpt hf

The model, tokenizer, data (packed rows, same order and same rows per rank) and seeds are launch/train.py's
(lemo_ds.training); the Trainer's arguments are read from the DeepSpeed config (batch sizes, optimizer, warm-up,
clipping, precision) so that the Trainer and the config agree, as the Trainer requires. The lemo part is the one
line ``enable(trainer)`` (lemo_ds.integrations.transformers). It writes OUTPUT_DIR/metrics.jsonl (one line per
step: loss, learning rate, keep ratios, from the Trainer's log history) and the model (or LoRA adapter) in
Hugging Face format to OUTPUT_DIR/final. Bad input stops with one line "lemo_ds: error: ..." and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout that was not pip-installed: import lemo_ds from here
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lemo_ds.config import load_ds_config, split_ds_config  # noqa: E402
from lemo_ds.errors import LemoError, print_error_line  # noqa: E402
from lemo_ds.hf_compat import trainer_checkpointing_arguments  # noqa: E402
from lemo_ds.inject import enable_document_attention  # noqa: E402
from lemo_ds.integrations.transformers import enable  # noqa: E402
from lemo_ds.training import checkpointing, data, flags, launch_env, metrics, model, precision  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer  # noqa: E402

flags.silence_deprecated_collectives()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.job_parser(
        __doc__.split("\n\n")[0],
        output_dir="outputs/run_hf",
        output_help="metrics.jsonl, final/ (the trained model or adapter)",
        grad_ckpt_help="activation checkpointing; hf: TrainingArguments(gradient_checkpointing=True); deepspeed: "
        'DeepSpeed\'s; auto: deepspeed if the config has "activation_checkpointing", else off',
    )
    parser.add_argument("--no-save", action="store_true", help="do not write OUTPUT_DIR/final")
    return flags.parse_job_flags(parser, argv)


class PackedRows(torch.utils.data.IterableDataset):
    """launch/train.py's global rows (lemo_ds.training.data.packed_rows), endless. accelerate gives rank r rows
    [r * micro_batch, (r + 1) * micro_batch) of every world_size * micro_batch, as data.rank_batches does.

    ``own_shard``: accelerate runs DeepSpeed on CPU ranks as one process (its PartialState has no backend for
    DeepSpeed without an accelerator), so it neither shards the data nor gathers the logged loss; the dataset
    then hands each rank its rows itself (data.rank_batches), and the Trainer logs rank 0's loss."""

    def __init__(self, files: list[Path], tokenizer: Any, seq_len: int, seed: int, micro_batch: int) -> None:
        self.files, self.tokenizer, self.seq_len, self.seed = files, tokenizer, seq_len, seed
        self.micro_batch = micro_batch
        self.own_shard = False

    def __iter__(self):
        rows = data.packed_rows(self.files, self.tokenizer, self.seq_len, self.seed)
        if not self.own_shard:
            for row in rows:
                yield {"input_ids": row.input_ids, "labels": row.labels, "position_ids": row.position_ids}  # [s]
            return
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        for batch in data.rank_batches(rows, rank=rank, world_size=world, micro_batch=self.micro_batch):
            for index in range(self.micro_batch):
                yield {key: value[index] for key, value in batch.items()}  # [s] each


def trainer_arguments(ds_config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """TrainingArguments that agree with the DeepSpeed config (the Trainer refuses a config that contradicts its
    arguments, and fills the config's "auto" values from them)."""
    flags.require_optimizer(ds_config)
    optimizer = ds_config["optimizer"].get("params", {})
    warmup = (ds_config.get("scheduler") or {}).get("params", {}).get("warmup_num_steps", 0)
    beta1, beta2 = optimizer.get("betas", (0.9, 0.999))
    return dict(
        per_device_train_batch_size=flags.micro_batch_size(ds_config),
        gradient_accumulation_steps=int(ds_config.get("gradient_accumulation_steps", 1)),
        learning_rate=optimizer.get("lr", 1e-3),
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_epsilon=optimizer.get("eps", 1e-8),
        weight_decay=optimizer.get("weight_decay", 0.0),
        max_grad_norm=ds_config.get("gradient_clipping", 0.0),
        warmup_steps=warmup,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # launch/train.py's loss: each rank's token mean, averaged over the ranks
        average_tokens_across_devices=False,
    )


def main(argv: list[str] | None = None) -> int:
    from deepspeed.accelerator import get_accelerator
    from transformers import Trainer, TrainingArguments

    args = parse_args(argv)
    launch_env.default_single_process_env()
    try:
        raw = flags.apply_flag_overrides(load_ds_config(args.deepspeed), lr=args.lr, predictor=None,
                                         config_path=args.deepspeed, max_steps=args.max_steps)  # fmt: skip
        lemo, ds_config = split_ds_config(raw)  # the one validation of the "lemo" section
        device_type = get_accelerator().device_name()
        ds_config, dtype, _ = precision.resolve_precision(ds_config, device_type)
        if device_type == "cpu" and dtype == torch.bfloat16:
            # TrainingArguments refuses bf16 without a GPU unless use_cpu is set, which would take the Trainer off
            # DeepSpeed: the Trainer path trains in fp32 on a CPU, even one with native bf16.
            ds_config, dtype = precision.without_bf16(ds_config), torch.float32
        grad_ckpt = checkpointing.resolve_mode(args.grad_ckpt, ds_config)
        source = model.resolve_model(args.model)
        tokenizer = ByteTokenizer() if source.kind == "preset" else load_hf_tokenizer(args.model)
        files = data.discover_files(args.data)
        data.check_corpus(files, tokenizer, args.seq_len, args.data)
        launch_env.set_cpu_threads(device_type)
        # Built before the model: under ZeRO-3 it makes from_pretrained/from_config partition as they build.
        training_args = TrainingArguments(
            output_dir=args.output_dir,
            deepspeed=dict(ds_config),  # the Trainer fills its "auto" values in: a copy
            max_steps=args.max_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            **(trainer_checkpointing_arguments(use_reentrant=False) if grad_ckpt == "hf" else {}),
            disable_tqdm=True,
            **trainer_arguments(ds_config, dtype),
        )
        net = model.build_model(source, dtype, args.seed)
        if grad_ckpt == "deepspeed":
            checkpointing.configure_activation_checkpointing(net, ds_config, grad_ckpt)
        if args.lora_r > 0:
            net = model.add_lora(net, args.lora_r, args.seed)
        dataset = PackedRows(files, tokenizer, args.seq_len, args.seed, training_args.per_device_train_batch_size)
        trainer = Trainer(model=net, args=training_args, train_dataset=dataset)
        if lemo is not None:  # the lemo_ds line, with the section parsed above (the Trainer's config holds none)
            enable(trainer, config=lemo)
        # The rows are packed: a dense job attends within documents without [s, s] masks too, as launch/train.py.
        enable_document_attention(trainer.model)
        dataset.own_shard = trainer.accelerator.num_processes < int(os.environ.get("WORLD_SIZE", "1"))
        trainer.train()
        writer = writes_files(trainer)
        if not args.no_save:
            save_final(trainer, Path(args.output_dir) / "final", writer, every_rank_saves=dataset.own_shard)
        if writer:
            write_metrics(trainer, Path(args.output_dir) / "metrics.jsonl", source.config.num_hidden_layers)
    except LemoError as error:
        print_error_line(error)
        return 2
    finally:
        launch_env.release_cpu_comm_buffer()  # DeepSpeed's CPU backend leaks it otherwise
    return 0


def writes_files(trainer: Any) -> bool:
    """Whether this process writes the run's files: global rank 0. The Trainer's own test
    (is_world_process_zero) is true on every CPU rank, which accelerate runs as one process each (PackedRows), so
    two ranks appended to the same metrics.jsonl and wrote the same model files at once."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return trainer.is_world_process_zero()


def save_final(trainer: Any, final: Path, writer: bool, every_rank_saves: bool) -> None:
    """The trained model (or adapter) in Hugging Face format, written by global rank 0 only. Every rank calls
    save_model (under ZeRO-3 it gathers the partitioned weights, a collective); where the Trainer would let every
    rank write (``every_rank_saves``: accelerate runs each CPU rank as one process, PackedRows.own_shard), the other
    ranks write into a temporary folder that is then removed."""
    if writer or not every_rank_saves:
        trainer.save_model(str(final))
        return
    with tempfile.TemporaryDirectory(prefix="lemo_final_unused_") as unused:
        trainer.save_model(unused)


def write_metrics(trainer: Any, path: Path, num_layers: int) -> None:
    """launch/train.py's metrics.jsonl fields (step, loss, lr, keep ratios) from the Trainer's log history."""
    log = metrics.MetricsLog(path)
    for entry in trainer.state.log_history:
        if "loss" not in entry:
            continue
        per_layer = [entry.get(f"keep_ratio_layer{index}", 1.0) for index in range(num_layers)]
        log.write({"step": entry["step"], "loss": entry["loss"], "lr": entry.get("learning_rate"),
                   "mean_keep_ratio": sum(per_layer) / num_layers, "keep_ratio_per_layer": per_layer,
                   **{key: value for key, value in entry.items() if key.startswith("predictor_recall")}})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
