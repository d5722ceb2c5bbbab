"""What the two-rank equivalence scripts in this folder (zero3_equivalence.py, sp_equivalence.py) share: the tiny
Llama, the DeepSpeed config, the ZeRO model started from the single-process reference's weights, the lemo_ds
engine, and the full (gathered) gradients compared with the reference's.

The scripts run as ``deepspeed tests/dist/<script>.py`` (this folder is then first on sys.path). lemo_ds is
imported here, so a script that puts the checkout first on sys.path must do so before importing this module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM, LlamaConfig

import lemo_ds

VOCAB = 64


def build(seed: int, use_cache: bool = True):
    """The tiny Llama in training mode, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = use_cache
    return model.train()


def ds_config(zero_stage: int = 3, lemo: dict | None = None, sequence_parallel_size: int | None = None) -> dict:
    """One sample per rank, one step per backward; ``lemo`` None: no "lemo" section at all."""
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    if sequence_parallel_size is not None:
        config["sequence_parallel_size"] = sequence_parallel_size
    config["zero_optimization"] = {"stage": zero_stage}
    if zero_stage == 3:
        # Partition every parameter, however small: the tiny model's would otherwise all stay whole on each rank.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["zero_allow_untested_optimizer"] = True
    if lemo is not None:
        config["lemo"] = lemo
    return config


def zero_model(config: dict, reference, checkpointing: bool, use_cache: bool = True):
    """The tiny Llama built under deepspeed.zero.Init (ZeRO-3 only) with ``reference``'s weights."""
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=config["zero_optimization"]["stage"] == 3):
        model = build(seed=0, use_cache=use_cache)
    # zero.Init draws its initial values in its own order: start both models from the same weights.
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([ours], modifier_rank=0), torch.no_grad():
            ours.copy_(theirs)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lemo_engine(model, config: dict, mpu=None):
    """lemo_ds.initialize with plain SGD (the step is never taken: only the gradients are compared)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = lemo_ds.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    return engine


def full_grads(engine) -> list[torch.Tensor]:
    """Every parameter's whole gradient, gathered from the ZeRO partitions (a collective: every rank calls it)."""
    return [safe_get_full_grad(param) for param in engine.module.parameters()]


def max_grad_diff(grads: list[torch.Tensor], reference) -> float:
    """The largest absolute difference between ``grads`` and the reference's gradients, parameter by parameter."""
    return max((ours - theirs.grad).abs().max().item() for ours, theirs in zip(grads, reference.parameters()))


def write_report(report: dict) -> None:
    """This rank's result for the test that started the job: a file ``rank<N>.json`` in $LEMO_TEST_REPORT_DIR
    (tests/launch_util.py: run_for_reports), written whole then renamed so the test never reads half of it; also
    printed for a person reading the job's output."""
    print(json.dumps(report), flush=True)
    folder = os.environ.get("LEMO_TEST_REPORT_DIR")
    if folder:
        path = Path(folder) / f"rank{report['rank']}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(report))
        partial.replace(path)


def leave(code: int) -> None:
    """Leave the process group, then the process with ``code``, without the interpreter's teardown: a rank that had
    written its report still aborted in native destructors ("terminate called without an active exception", exit -6),
    with the group left open (one run of the CPU suite in many) and again with it destroyed (2026-12-08, the
    sp_equivalence checkpointing case, both ranks' results equal to the reference). The report is on disk and the
    output flushed; what the test checks is done."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
