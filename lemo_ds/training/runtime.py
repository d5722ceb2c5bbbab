"""The Runtime: the live objects of a started job (the process group, the model, the DeepSpeed engine, this rank's
data), built from its Job by ``start``, and ``close``.

``start`` brings the process group up, has the ranks agree on OUTPUT_DIR (a folder that some nodes cannot write
stops every rank, naming them, exit status 2), opens OUTPUT_DIR/deepspeed.log for DeepSpeed's lines
(lemo_ds.training.ds_output), starts the heartbeat between the ranks (a node that dies or is cut off stops every
other rank within 1.5 x --peer-timeout seconds with one line naming it, exit status 4: lemo_ds.training.peers),
then builds the model and the engine and, on --resume, loads the checkpoint (--lr on resume sets the new rate and
says so in one line).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

import lemo_ds
from lemo_ds.predictors import job as predictor_job
from lemo_ds.scorers import build_scorer
from lemo_ds.training import (
    checkpointing,
    data,
    ds_output,
    launch_env,
    metrics,
    model,
    output_dir,
    parallel,
    peers,
    resume,
    tracking,
)
from lemo_ds.training.job import Job


@dataclass
class Runtime:
    """The live objects of a started job, built from its Job by ``start``."""

    rank: int
    engine: Any  # the DeepSpeed engine
    controller: Any  # the lemo controller; None when dense
    sp: Any  # the sequence-parallel state; None without SP
    batches: Iterator[dict[str, torch.Tensor]]  # this rank's micro-batches
    start_step: int  # 0, or the step of the checkpoint this run continues
    resumed: bool  # this run continues a checkpoint
    log: Callable[[str], None]  # rank 0 prints
    metrics: metrics.MetricsLog | None  # rank 0's
    wandb: tracking.WandbLogger | None
    zero3_handle: Any  # DeepSpeed's ZeRO-3 context: must stay alive while the model exists
    lr_on_resume: dict[str, float] | None = None  # --lr given on resume: {"lr": the new rate, "checkpoint_lr": ...}
    peer_watch: peers.PeerWatch | None = None  # the heartbeat that notices a lost node (several ranks, --peer-timeout)


def start(job: Job, deepspeed_output: ds_output.DeepSpeedOutput) -> Runtime:
    """The scorer, the distributed group, the output folder (agreed on by every rank), the heartbeat between the
    ranks, model, engine, data."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    scorer = None
    if job.lemo is not None:
        # Built once, here, before any collective: an unavailable scorer or a bad predictors file (or one made for
        # another model) stops every rank with one line; lemo_ds.initialize then converts the model with it.
        scorer = build_scorer(job.lemo)
        if hasattr(scorer, "bind"):
            scorer.bind(job.source.config)

    build = launch_env.pending_op_build()
    if build is not None:  # rank 0 says why this start is slow; the launcher has set RANK (a world of one: 0)
        _rank0_printer(int(os.environ.get("RANK", "0")))(
            f"compiling DeepSpeed's shared-memory all-reduce for CPU ranks, once (about a minute; later starts "
            f"reuse it from {build})"
        )
    with ds_output.stdout_to_log():  # DeepSpeed prints "... op built successfully" on every rank
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank = torch.distributed.get_rank()
    if torch.distributed.get_world_size() > 1:  # a folder that one node cannot write stops every rank, here
        output_dir.agree_writable(job.unwritable, launch_env.node_name())
    deepspeed_output.open(job.output_dir)  # writable on every rank: DeepSpeed's held and later lines go there
    watch = watch_peers(job, rank)
    try:
        return _start(job, rank, scorer, watch)
    except BaseException:
        if watch is not None:  # the ranks stop together on the same error: none is lost
            watch.stop()
        raise


def watch_peers(job: Job, rank: int) -> peers.PeerWatch | None:
    """With several ranks and --peer-timeout: the heartbeat that stops every rank within the timeout, with one line
    naming the node, when a node dies or is cut off (lemo_ds.training.peers)."""
    if torch.distributed.get_world_size() == 1 or job.peer_timeout == 0 or "MASTER_PORT" not in os.environ:
        return None  # (no MASTER_ADDR:MASTER_PORT: a rendezvous other than env://, without a store to beat through)
    nodes = peers.node_names()

    def after() -> str:
        advice = resume.next_run_advice(job.ckpt_dir)
        return f"{resume.latest_note(job.ckpt_dir)}; {advice} on the nodes left (a requeued Slurm job does so itself)"

    return peers.PeerWatch(
        rank, nodes, job.peer_timeout, after, before_exit=launch_env.release_cpu_comm_buffer,
        # on a line of its own beside rank 0's progress bar; one write, as lemo_ds.errors.write_line says why
        write=lambda line: tqdm.write(line + "\n", file=sys.stderr, end=""),
    ).start()  # fmt: skip


def _start(job: Job, rank: int, scorer: Any, watch: peers.PeerWatch | None) -> Runtime:
    """The rest of ``start``, once the process group is up and the output folder agreed on."""
    launch_env.set_cpu_threads(job.device_type)
    log = _rank0_printer(rank)
    for warning in job.warnings:
        log(f"warning: {warning}")
    if job.overwrite:
        output_dir.start_over(job.output_dir)
    if job.set_aside:
        stop = output_dir.describe_stop(output_dir.stopped_run(job.output_dir) or {})  # read before it moves
        folder = output_dir.set_aside_stopped_run(job.output_dir)
        log(f"the earlier run in {job.output_dir} {stop} before its first checkpoint: starting over from step 0; "
            f"its metrics.jsonl and summary.json are now in {folder}")  # fmt: skip
    log(f"corpus: {data.describe_corpus(job.data, list(job.files))}")
    if job.precision_note:
        log(job.precision_note)

    # -- model: partitioned as it is built under ZeRO-3; checkpointing and LoRA before the lemo conversion ---
    zero3_handle = model.zero3_context(job.ds_config)  # must stay alive while the model is built
    net = model.build_model(job.source, job.dtype, job.seed)
    checkpointing.configure_activation_checkpointing(net, job.ds_config, job.grad_ckpt)
    if job.lora_r > 0:
        # the adapters in the training dtype, as DeepSpeed keeps every parameter (float32 masters in its optimizer)
        net = model.add_lora(net, job.lora_r, job.seed, dtype=job.dtype)
    total, trainable = model.count_parameters(net)
    log(
        f"model: {job.model} ({job.source.config.model_type}, {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable), {str(job.dtype).removeprefix('torch.')}, "
        f"activation checkpointing {job.grad_ckpt}"
    )

    # lemo_ds.initialize = deepspeed.initialize after converting the sparse layers with the parsed section.
    params = [p for p in net.parameters() if p.requires_grad]
    sp = parallel.setup(job.dims, net)  # Ulysses sequence parallelism when the config's sequence_parallel_size > 1
    with ds_output.stdout_to_log():
        engine, _, _, _ = lemo_ds.initialize(
            model=net, model_parameters=params, config=job.ds_config, mpu=sp.mpu if sp is not None else None,
            lemo_config=job.lemo, lemo_scorer=scorer,
        )  # fmt: skip
    controller = lemo_ds.get_controller(engine)
    # The rows are packed: the dense job attends within documents without [s, s] masks too, as apply_lemo does.
    lemo_ds.enable_document_attention(net)
    if controller is not None:
        log(f"lemo: keep ratio per layer {controller.target_ratios}, scorer {job.lemo.scorer}")
    else:
        log("lemo: off (dense training)")

    # -- data, from step 0 or from the checkpoint's step and data position ------------------------------------
    start_step, start_row, lr_on_resume = 0, 0, None
    with ds_output.stdout_to_log():
        state = resume.load(engine, job.ckpt_dir, job, log) if job.resume else None  # None: --resume auto found none
    if state is not None:
        start_step, start_row = state["step"], state["rows_consumed"]
        if job.lr is not None:
            lr_on_resume = new_lr_on_resume(engine, job.lr, log)
    rows = data.packed_rows(list(job.files), job.tokenizer, job.seq_len, job.seed, start=start_row)
    batches = parallel.rank_batches(rows, job.dims, sp, rank, engine.device)
    # Predictors without a file: trained on this rank's first micro-batches (model frozen, oracle labels), read
    # from a second iterator so that training still sees exactly the rows it would have seen. Not when the checkpoint
    # restored them (resume.load): calibrating again on the rows after it would select otherwise than the run did.
    first_rows = data.packed_rows(list(job.files), job.tokenizer, job.seq_len, job.seed, start=start_row)
    first = data.rank_batches(first_rows, rank=rank, world_size=job.dims.world_size, micro_batch=job.dims.micro_batch)
    predictor_job.calibrate_before_training(engine, first, job.lemo, engine.device, log)

    metrics_log = wandb = None
    if rank == 0:
        resume_step = start_step if state is not None else None
        metrics_log = metrics.MetricsLog(job.output_dir / "metrics.jsonl", resume_step=resume_step)
        wandb = tracking.WandbLogger(job.ds_config, dict(job.flag_values)) if job.use_wandb else None
    return Runtime(rank, engine, controller, sp, batches, start_step, state is not None, log, metrics_log, wandb,
                   zero3_handle, lr_on_resume, watch)  # fmt: skip


def new_lr_on_resume(engine: Any, lr: float, log: Callable[[str], None]) -> dict[str, float]:
    """--lr given on resume: the checkpoint restored its own rate (and the scheduler its position); from the next
    step on the rate is the one --lr gives, as on a fresh run of this config, and one line says so."""
    before, now = resume.set_lr_after_resume(engine, lr)
    scheduler = type(engine.lr_scheduler).__name__
    scheduled = "" if math.isclose(now, lr) else f", the {scheduler} schedule's rate at this step for --lr {lr:g}"
    log(f"--lr {lr:g} on resume: the learning rate is now {now:g}{scheduled} (the checkpoint had {before:g})")
    return {"lr": lr, "now": now, "checkpoint_lr": before}


def _rank0_printer(rank: int) -> Callable[[str], None]:
    stream = sys.stdout  # this one: while DeepSpeed's prints go to its log (ds_output.stdout_to_log), lemo_ds's don't

    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(f"lemo_ds: {message}", file=stream)
            stream.flush()

    return log


def close(rt: Runtime | None) -> None:
    """What ``start`` started (also after a stop): the heartbeat first, the tracker, then the process group."""
    if rt is not None and rt.peer_watch is not None:
        rt.peer_watch.stop()  # before the group goes: ranks that end at different moments are not lost peers
    if rt is not None and rt.wandb is not None:
        rt.wandb.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
