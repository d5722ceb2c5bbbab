"""The training loop of a started job: the steps, the checkpoints along the way and the last one, held-out
evaluation, metrics.jsonl (one line per step) and summary.json.

A NaN/inf loss or weights, or a save the disk refuses, stop the job (TrainingStopped: one line, exit status 3)
with nothing bad saved and a summary.json with "status": "stopped", which a rerun in the same OUTPUT_DIR reads
(lemo_ds.training.output_dir); 'latest' still names the last complete checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lemo_ds.predictors import job as predictor_job
from lemo_ds.predictors.scorer import find_predictor_scorer
from lemo_ds.training import data, evaluate, metrics, output_dir, parallel, resume
from lemo_ds.training.errors import TrainingStopped
from lemo_ds.training.job import Job
from lemo_ds.training.runtime import Runtime


@dataclass
class Progress:
    """How far this process got: the step in flight, the last step it completed, its totals."""

    at: int  # the step being trained (or saved); after the loop, the last one
    done: int  # the last step trained to the end (the checkpoint's step before any)
    totals: metrics.RunTotals = field(default_factory=metrics.RunTotals)
    started: float = field(default_factory=time.perf_counter)


def train(job: Job, rt: Runtime) -> None:
    """The steps, the last save, then evaluation and summary.json. A stop (TrainingStopped: a NaN loss, a save the
    disk refused) writes a summary.json that says so before it ends the job: a rerun reads it (output_dir)."""
    progress = Progress(at=rt.start_step, done=rt.start_step)
    try:
        run_steps(job, rt, progress)
        step = progress.done
        if job.save and step > rt.start_step and not (job.save_every and step % job.save_every == 0):
            resume.save(rt.engine, job.ckpt_dir, step, step * job.dims.rows_per_step, job, keep=job.keep_checkpoints)
    except TrainingStopped as stop:
        write_stopped_summary(job, rt, progress, stop)
        raise
    if progress.totals.steps == 0:
        rt.log(f"nothing to train: the run is at step {progress.done} and --max-steps is {job.max_steps}")
        return
    evaluation = heldout_evaluation(job, rt)
    if job.eval_passkey is not None:
        evaluation.update(evaluate.passkey_evaluation(rt.engine, job.eval_passkey, job.tokenizer, rt.log))
    if rt.rank == 0:
        summary = {**_summary(job, rt, progress, status="done"), **evaluation}
        metrics.write_json_atomic(job.output_dir / "summary.json", summary)
        loss, keep = summary["final_loss"], summary["mean_keep_ratio"]
        rt.log(
            f"done: step {progress.done}, loss {'n/a' if loss is None else f'{loss:.4f}'}, "
            f"{summary['tokens_per_s']:,.0f} tok/s, mean keep ratio {'n/a' if keep is None else f'{keep:.3f}'}; "
            f"wrote {job.output_dir / 'summary.json'}"
        )


def run_steps(job: Job, rt: Runtime, progress: Progress) -> None:
    engine, dims = rt.engine, job.dims
    tokens_per_step = dims.rows_per_step * job.seq_len  # all ranks together
    mem_label = "cuda peak" if job.device_type == "cuda" else "peak RSS"
    bar = tqdm(total=job.max_steps, initial=rt.start_step, disable=rt.rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    if rt.controller is not None:
        rt.controller.reset_stats()

    recall_note = ""
    try:
        for step in range(rt.start_step + 1, job.max_steps + 1):
            progress.at = step
            if rt.peer_watch is not None:
                rt.peer_watch.phase = f"step {step}"  # what a lost node's message says the job was doing
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on inside engine.step)
            loss_value, keep_per_layer = one_step(job, rt)
            if not math.isfinite(loss_value):
                stop_on_nonfinite_loss(job, rt, step, loss_value, lr)  # every rank: they all see the same reduced loss
            step_s = time.perf_counter() - t0
            mean_keep = sum(keep_per_layer) / len(keep_per_layer)
            # A process's first step pays for warm-up (allocation, lazy init): throughput leaves it out.
            warm = step > rt.start_step + 1 or job.max_steps == rt.start_step + 1
            progress.totals.add(loss_value, keep_per_layer, tokens_per_step, step_s, timed=warm)
            progress.done = step

            if job.save and job.save_every and step % job.save_every == 0:
                # The save trains this step's predictor refresh first (it belongs in the checkpoint); its recall
                # still waits for refresh_record, below.
                resume.save(engine, job.ckpt_dir, step, step * dims.rows_per_step, job, keep=job.keep_checkpoints)
            refreshed = predictor_job.refresh_record(engine)  # online refresh of the predictors: recall (all ranks)
            recall_note = f" | recall {refreshed['predictor_recall']:.3f}" if refreshed else recall_note
            if rt.rank == 0:
                peak, _ = metrics.peak_memory(job.device_type)
                record = {"step": step, "loss": loss_value, "tokens": tokens_per_step, "step_time_s": step_s,
                          "tokens_per_s": tokens_per_step / step_s, "lr": lr, "mean_keep_ratio": mean_keep,
                          "keep_ratio_per_layer": keep_per_layer, "peak_mem_bytes": peak, **refreshed}  # fmt: skip
                if rt.lr_on_resume is not None and step == rt.start_step + 1:
                    record["lr_on_resume"] = rt.lr_on_resume  # the first step at the rate --lr set on resume
                rt.metrics.write(record)
                if rt.wandb is not None:
                    rt.wandb.log(record)
                bar.update(1)
                if step % job.log_every == 0 or step == job.max_steps:
                    bar.set_postfix_str(
                        f"loss {loss_value:.4f} | {tokens_per_step / step_s:,.0f} tok/s | keep {mean_keep:.2f} | "
                        f"{mem_label} {metrics.format_bytes(peak)}{recall_note}"
                    )
    finally:
        bar.close()  # before a stop's error line, which would otherwise share the bar's line


def one_step(job: Job, rt: Runtime) -> tuple[float, list[float]]:
    """One optimizer step over ``grad_accum`` micro-batches: (the loss, the kept share per layer [L]), both averaged
    over the data-parallel ranks by one all-reduce, so every rank reports the same numbers."""
    engine, dims = rt.engine, job.dims
    loss_sum = torch.zeros((), device=engine.device)
    for _ in range(dims.grad_accum):  # engine.step() only updates at the accumulation boundary
        batch = {k: v.to(engine.device) for k, v in next(rt.batches).items()}  # [b, s] each
        loss, reported = parallel.forward_loss(engine, batch, rt.sp)
        engine.backward(loss)
        engine.step()
        loss_sum += reported.float()
    keep = metrics.take_keep_ratios(rt.controller, job.source.config.num_hidden_layers)  # [L], 1.0 when dense
    reduced = torch.cat([loss_sum.reshape(1) / dims.grad_accum, keep.to(engine.device)])  # [1 + L]
    torch.distributed.all_reduce(reduced)
    loss_value, *keep_per_layer = (reduced / dims.world_size).tolist()
    return loss_value, keep_per_layer


def write_stopped_summary(job: Job, rt: Runtime, progress: Progress, stop: TrainingStopped) -> None:
    """summary.json of a run that stopped: how far it got, why, and what a next run can continue from (rank 0).
    A disk too full for it too costs a line of warning, not the stop's own message."""
    if rt.rank != 0:
        return
    found = resume.find_checkpoint(job.ckpt_dir)
    summary = {**_summary(job, rt, progress, status=output_dir.STOPPED), "stopped_at_step": progress.at,
               "stop_reason": str(stop), "resumable_from": found.tag}  # fmt: skip
    try:
        metrics.write_json_atomic(job.output_dir / "summary.json", summary)
    except OSError as error:
        rt.log(f"warning: could not write {job.output_dir / 'summary.json'} ({error.strerror or error})")


def stop_on_nonfinite_loss(job: Job, rt: Runtime, step: int, loss_value: float, lr: float) -> None:
    """A NaN/inf loss: the weights are (or are about to be) ruined, so stop before anything saves them. The
    step's record says so in strict JSON (loss null)."""
    if rt.rank == 0:
        rt.metrics.write({"step": step, "loss": None, "loss_nonfinite": str(loss_value), "lr": lr})
    raise TrainingStopped(
        f"the loss is {loss_value} at step {step}; stopped without saving ({resume.latest_note(job.ckpt_dir)}); "
        f"lower --lr (or check the data), then {resume.next_run_advice(job.ckpt_dir)}"
    )


def heldout_evaluation(job: Job, rt: Runtime) -> dict:
    """With --eval-data: dense perplexity on the held-out rows and, with the predictor scorer, the predictors'
    recall against the oracle on the same rows (every rank takes part; rank 0 logs)."""
    if job.eval_files is None:
        return {}

    def batches():
        rows = data.heldout_rows(list(job.eval_files), job.tokenizer, job.seq_len, job.seed, limit=job.eval_rows)
        return data.rank_batches(rows, rank=rt.rank, world_size=job.dims.world_size, micro_batch=job.dims.micro_batch)

    started = time.perf_counter()
    result = evaluate.heldout_perplexity(rt.engine, batches())
    if find_predictor_scorer(rt.engine) is not None:  # scorer "predictor" with at least one sparse layer
        result.update(evaluate.heldout_recall(rt.engine, batches()))
    recall = f", predictor recall {result['predictor_recall']:.3f}" if "predictor_recall" in result else ""
    rt.log(
        f"held-out: {result['eval_tokens']:,} tokens, loss {result['eval_loss']:.4f}, perplexity "
        f"{result['eval_ppl']:.3f}{recall} (dense evaluation, {time.perf_counter() - started:.1f} s)"
    )
    return result


def _summary(job: Job, rt: Runtime, progress: Progress, status: str) -> dict:
    peak, kind = metrics.peak_memory(job.device_type)
    totals = progress.totals
    return {
        "status": status,  # "done", or "stopped" (output_dir.STOPPED): a NaN loss, a save the disk refused
        "steps": progress.done,
        "steps_this_run": totals.steps,
        "final_loss": totals.final_loss,
        "tokens_per_s": totals.tokens_per_s,  # all ranks' tokens, first step of this process left out
        "peak_mem_bytes": peak,  # rank 0's
        "peak_mem_kind": kind,
        "mean_keep_ratio": totals.mean_keep_ratio,
        "keep_ratio_per_layer": totals.keep_ratio_per_layer,
        "world_size": job.dims.world_size,
        "sequence_parallel_size": job.dims.sp,
        "zero_stage": job.zero_stage,
        "model": job.model,
        "model_type": job.source.config.model_type,
        "seq_len": job.seq_len,
        "micro_batch": job.dims.micro_batch,
        "grad_accum": job.dims.grad_accum,
        "lora_r": job.lora_r,
        "scorer": job.lemo.scorer if job.lemo is not None else None,
        "dtype": str(job.dtype).removeprefix("torch."),
        "grad_ckpt": job.grad_ckpt,
        "device": job.device_type,
        "resumed_from_step": rt.start_step if rt.resumed else None,
        "lr_on_resume": rt.lr_on_resume,
        "elapsed_s": time.perf_counter() - progress.started,
        "ended_at": time.strftime("%Y%m%d-%H%M%S"),
        "command": " ".join(sys.argv),
    }
