"""The Job: what a training job is, built once from launch/train.py's flags and checked before anything heavy
happens (no process group, no model).

Every rank builds it from the same flags and files, so they all reach the same verdict: bad input (a bad flag
value included), a job the memory planner predicts does not fit (``--memory-check on``), an OUTPUT_DIR holding an
earlier run (without --resume or --overwrite) or one that cannot be written stops every rank before any collective
with one line "lemo_ds: error: ..." and exit status 2. An OUTPUT_DIR that some nodes cannot write is only noted
here; the ranks agree on it once the process group is up (lemo_ds.training.runtime). A folder whose run stopped
before its first checkpoint takes the same command again: its files are moved to OUTPUT_DIR/stopped_runs/ first
(lemo_ds.training.output_dir).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

import lemo_ds
from lemo_ds.config import LemoConfig, load_ds_config, split_ds_config
from lemo_ds.plan import job as plan_job
from lemo_ds.plan import refusal as plan_refusal
from lemo_ds.plan import search as plan_search
from lemo_ds.training import (
    checkpointing,
    data,
    flags,
    model,
    output_dir,
    parallel,
    precision,
    resume,
    sparsity,
    tracking,
)
from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.parallel import ParallelDims
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer


@dataclass(frozen=True)
class Job:
    """What the job is, built once from the flags and checked before anything heavy happens (no process group, no
    model). Every rank builds it from the same flags and files, so they all reach the same verdict."""

    # what to train on what: the model, its tokenizer, the text
    model: str  # --model: a preset or a Hugging Face model directory
    source: model.ModelSource
    tokenizer: Any  # the presets' ByteTokenizer, else the model directory's own
    data: str | None  # --data as given (a checkpoint records it)
    files: tuple[Path, ...]
    eval_files: tuple[Path, ...] | None  # None: no held-out evaluation
    eval_passkey: str | None  # --eval-passkey: the answer file (checked as the flag is parsed)
    seq_len: int
    eval_rows: int
    lora_r: int  # 0: full fine-tuning
    seed: int
    lr: float | None  # --lr as given (None: the config's); on resume it replaces the checkpoint's rate
    # how: DeepSpeed, lemo, precision, parallelism
    ds_config: dict[str, Any]  # flags applied, precision resolved, without its "lemo" section
    lemo: LemoConfig | None  # the parsed "lemo" section; None: dense (no section, or "enabled": false)
    dtype: torch.dtype
    precision_note: str | None
    device_type: str
    zero_stage: int
    grad_ckpt: str  # checkpointing.MODES, "auto" resolved
    dims: ParallelDims
    # how long, and where everything goes
    max_steps: int
    log_every: int
    output_dir: Path
    resume: bool | str  # --resume: False, True or "auto"
    overwrite: bool
    set_aside: bool  # the folder holds a run that stopped before its first checkpoint: move its files, start over
    save: bool  # not --no-save
    save_every: int
    keep_checkpoints: int
    # Folders this rank cannot write (OUTPUT_DIR, its checkpoints/). With several ranks the ranks agree on them once
    # the process group is up (start): a node may lack a mount that another has.
    unwritable: tuple[output_dir.Unwritable, ...]
    peer_timeout: float  # --peer-timeout (0: off)
    use_wandb: bool
    flag_values: Mapping[str, Any]  # every flag as given: the tracker's run config
    warnings: tuple[str, ...]  # found while describing, logged once by rank 0 (e.g. a --seq-len too short to sparsify)

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / output_dir.CHECKPOINTS


def describe(args: argparse.Namespace) -> Job:
    """Every check of the input, before any collective: local, deterministic work only, so every rank reaches the
    same verdict and a bad input stops them all (TrainingSetupError, LemoConfigError, ...). The one exception: with
    several ranks, whether OUTPUT_DIR can be written is only noted here, and agreed on in ``start`` (nodes may see
    different file systems)."""
    from deepspeed.accelerator import get_accelerator

    device_type = get_accelerator().device_name()
    raw = flags.apply_flag_overrides(
        load_ds_config(args.deepspeed), lr=args.lr, predictor=args.predictor, config_path=args.deepspeed,
        max_steps=args.max_steps,
    )  # fmt: skip
    section, ds_config = split_ds_config(raw)  # the one validation of the "lemo" section
    lemo = section if section is not None and section.enabled else None
    ds_config, dtype, precision_note = precision.resolve_precision(ds_config, device_type)
    flags.require_optimizer(ds_config)

    source = model.resolve_model(args.model)
    warnings = []
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grad_ckpt = checkpointing.resolve_mode(args.grad_ckpt, ds_config)
    if lemo is not None:  # a family lemo cannot convert is named first, before the planner reads its shape
        lemo_ds.policies.check_supported(source.config.model_type)
    if args.memory_check == "on":  # before any weights are loaded: a job that cannot fit stops here, in one line
        given = raw.get("lemo")  # the section as written: the refusal prints it with the plan's changes
        args.seq_len, note = check_memory(args, source, given, ds_config, lemo, dtype, device_type, world_size,
                                          grad_ckpt)  # fmt: skip
        warnings += [note] if note else []
    if lemo is not None:
        if args.seq_len < lemo.block_size:
            raise TrainingSetupError(
                f"--seq-len {args.seq_len} is shorter than one lemo block (block_size {lemo.block_size}); "
                f"use --seq-len {lemo.block_size} or more, or a smaller lemo.block_size"
            )
        sp_size = int(ds_config.get("sequence_parallel_size", 1) or 1)
        too_short = sparsity.too_short_warning(lemo, args.seq_len, source.config.num_hidden_layers, sp_size)
        warnings += [too_short] if too_short else []
    tokenizer = ByteTokenizer() if source.kind == "preset" else load_hf_tokenizer(args.model)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise TrainingSetupError(
            f"--model {args.model}: the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary "
            f"{source.config.vocab_size}; use the tokenizer the model was trained with"
        )
    files = data.discover_files(args.data)
    data.check_corpus(files, tokenizer, args.seq_len, args.data)
    eval_files = None
    if args.eval_data is not None:
        eval_files = data.discover_files(args.eval_data, flag="--eval-data")
        data.check_corpus(eval_files, tokenizer, args.seq_len, args.eval_data, flag="--eval-data")

    out = Path(args.output_dir)
    ckpt_dir = out / output_dir.CHECKPOINTS
    found = resume.find_checkpoint(ckpt_dir)  # one scan of the folder for every check below
    set_aside = False
    if args.resume is True:  # --resume auto may find nothing, and then starts fresh
        resume.require_checkpoint(ckpt_dir, found)
    if args.resume:
        ds_config = resume.universal_config(ckpt_dir, world_size, ds_config, found)
        resume.require_same_weights(ckpt_dir, args, found)
        set_aside = args.resume == resume.AUTO and _stopped_before_first_checkpoint(out, found)  # starts fresh too
    elif not args.overwrite:  # --overwrite: rank 0 clears the earlier run once every rank is past these checks
        set_aside = _stopped_before_first_checkpoint(out, found)
        if not set_aside:
            output_dir.refuse_earlier_run(out)
    folders = [(out, "--output-dir")] + ([] if args.no_save else [(ckpt_dir, "--output-dir")])
    unwritable = tuple(filter(None, (output_dir.writable_problem(folder, flag) for folder, flag in folders)))
    if unwritable and world_size == 1:
        raise TrainingSetupError(unwritable[0].message())

    return Job(
        model=args.model,
        source=source,
        tokenizer=tokenizer,
        data=args.data,
        files=tuple(files),
        eval_files=tuple(eval_files) if eval_files is not None else None,
        eval_passkey=args.eval_passkey,
        seq_len=args.seq_len,
        eval_rows=args.eval_rows,
        lora_r=args.lora_r,
        seed=args.seed,
        lr=args.lr,
        ds_config=ds_config,
        lemo=lemo,
        dtype=dtype,
        precision_note=precision_note,
        device_type=device_type,
        zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        grad_ckpt=grad_ckpt,
        dims=parallel.parallel_dims(
            ds_config, world_size=world_size, seq_len=args.seq_len, lemo=lemo, model_config=source.config
        ),
        max_steps=args.max_steps,
        log_every=args.log_every,
        output_dir=out,
        resume=args.resume,
        overwrite=args.overwrite,
        set_aside=set_aside,
        save=not args.no_save,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        unwritable=unwritable,
        peer_timeout=args.peer_timeout,
        use_wandb=tracking.prepare_wandb(ds_config, args.output_dir),
        flag_values=MappingProxyType(dict(vars(args))),
        warnings=tuple(warnings),
    )


def check_memory(
    args: argparse.Namespace, source: model.ModelSource, lemo_section: dict | None, ds_config: dict[str, Any],
    lemo: LemoConfig | None, dtype: torch.dtype, device_type: str, world_size: int, grad_ckpt: str,
) -> tuple[int, str | None]:  # fmt: skip
    """The planner's verdict (lemo_ds/plan): (the sequence length, a note for the log). ``--seq-len max``
    resolves to the longest length that fits; a length that does not fit is a TrainingSetupError naming the
    predicted peak, the memory and the change that fits."""
    device = "cuda" if device_type == "cuda" else "cpu"
    gpu_mem = args.gpu_mem or plan_search.default_gpu_mem(device)
    host_mem = args.host_mem or plan_search.default_host_mem()
    seq = 1 if args.seq_len == "max" else args.seq_len
    try:
        shape, setup = plan_job.job_setup(
            source.config, ds_config, lemo, seq_len=seq, lora_r=args.lora_r, world_size=world_size, device=device,
            dtype=dtype, checkpointing=grad_ckpt != "off",
        )  # fmt: skip
    except ValueError as error:  # a model the memory model cannot describe
        raise TrainingSetupError(f"--model {args.model}: {error}; train with --memory-check off") from None
    note = None
    if args.seq_len == "max":
        multiple = lemo.block_size if lemo is not None else 64
        seq = plan_search.longest_fit(shape, setup, gpu_mem, host_mem, multiple)
        if seq == 0:
            raise TrainingSetupError(
                f"--seq-len max: not even {multiple} tokens fit {plan_search.gib(gpu_mem)} of device memory "
                f"and {plan_search.gib(host_mem)} of host memory by the planner; give --gpu-mem/--host-mem or "
                "another --deepspeed config"
            )
        note = f"--seq-len max: {seq} tokens, the longest the memory planner predicts fits {plan_search.gib(gpu_mem)}"
        setup = plan_job.with_seq_len(setup, seq)
    result = plan_search.plan(shape, setup, gpu_mem, host_mem)
    if not result.fits:
        raise TrainingSetupError(plan_refusal.refusal(result, gpu_mem, host_mem, seq, lemo_section, ds_config))
    return seq, note


def memory_size(text: str) -> int:
    """--gpu-mem, --host-mem: a size such as 80GiB (argparse type; a bad one is the parser's one-line error)."""
    try:
        return plan_search.parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _stopped_before_first_checkpoint(out: Path, found: resume.Found) -> bool:
    """The folder's earlier run stopped (exit 3) before it had a complete checkpoint (``found``: its checkpoint
    folder's scan): nothing to continue, so a plain rerun starts over there (its files set aside, not deleted)
    instead of being refused."""
    return output_dir.stopped_run(out) is not None and found.tag is None
