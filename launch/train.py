"""Fine-tune a causal LM with DeepSpeed and LeMo token elimination (lemo_ds).

Run from the repository root:

    # the default: tiny Llama preset (random init), the Python stdlib as text, ZeRO-3 + LeMo (40% of blocks
    # kept in the deeper layers), LoRA r=8, 20 steps of 1024 tokens
    deepspeed launch/train.py --deepspeed ds_configs/zero3_lemo.json

    # two ranks (CPU ranks over gloo when there is no GPU), 3 steps of 256 tokens
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3_lemo.json --max-steps 3 --seq-len 256

    # the dense baseline: the same job with a config without its "lemo" section
    deepspeed launch/train.py --deepspeed ds_configs/zero3_dense.json

    # a local Hugging Face model and your own data, full fine-tuning, 16K tokens
    deepspeed launch/train.py --deepspeed ds_configs/zero3_lemo.json --model /models/Meta-Llama-3-8B \
        --data corpus.jsonl --lora-r 0 --seq-len 16384 --max-steps 200 --output-dir outputs/llama3

    # held-out evaluation at the end: dense perplexity (and predictor recall) on 32 rows of held-out text
    deepspeed launch/train.py --deepspeed ds_configs/zero3_lemo.json --data train/ --eval-data heldout/

    # continue a run from its latest checkpoint (same --output-dir), up to 40 steps; "--resume auto" also
    # starts fresh when there is no complete checkpoint yet (a requeued Slurm job: launch/slurm/)
    deepspeed launch/train.py --deepspeed ds_configs/zero3_lemo.json --max-steps 40 --resume

    # one process, without the launcher
    python launch/train.py --deepspeed ds_configs/zero3_lemo.json --max-steps 3

It writes OUTPUT_DIR/metrics.jsonl (one line per step), OUTPUT_DIR/summary.json (at the end) and DeepSpeed
checkpoints under OUTPUT_DIR/checkpoints/step{N} (the newest --keep-checkpoints of them). Bad input, an
OUTPUT_DIR holding an earlier run (without --resume or --overwrite) or one that cannot be written stops every
rank before any collective with one line "lemo_ds: error: ..." on stderr and exit status 2; a NaN/inf loss or
weights, or a save the disk refuses, stop the job with one line and exit status 3, nothing bad saved.

Shape of the job: parse -> build (checks, distributed start, model, engine, data) -> train -> close.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout that was not pip-installed: import lemo_ds from here
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds.config import load_ds_config, split_ds_config  # noqa: E402
from lemo_ds.errors import LemoError  # noqa: E402
from lemo_ds.predictors import job as predictor_job  # noqa: E402
from lemo_ds.scorers import build_scorer  # noqa: E402
from lemo_ds.training import (  # noqa: E402
    checkpointing,
    data,
    evaluate,
    flags,
    launch_env,
    metrics,
    model,
    output_dir,
    parallel,
    precision,
    resume,
    tracking,
)
from lemo_ds.training.errors import TrainingSetupError, TrainingStopped  # noqa: E402
from lemo_ds.training.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer  # noqa: E402

DEFAULT_CONFIG = REPO / "ds_configs" / "zero3_lemo.json"
# DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates: one warning per call site per rank.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        default=str(DEFAULT_CONFIG),
        metavar="CONFIG",
        help='DeepSpeed JSON config, optionally with a "lemo" section (default: ds_configs/zero3_lemo.json)',
    )
    add(
        "--model", default=DEFAULT_PRESET, help=f"local Hugging Face model directory, or a preset: {', '.join(PRESETS)}"
    )
    add("--data", default=None, help='text file, .jsonl ("text" field) or folder; default: the Python stdlib')
    add("--seq-len", type=int, default=1024, help="tokens per packed row")
    add("--max-steps", type=int, default=20, help="optimizer steps to train up to")
    add("--output-dir", default="outputs/run", help="metrics.jsonl, summary.json, checkpoints/")
    add("--lora-r", type=int, default=8, help="LoRA rank on q/k/v/o projections; 0 = full fine-tuning")
    add("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    add("--predictor", default=None, help='trained predictors file (lemo scorer "predictor")')
    add(
        "--grad-ckpt",
        choices=checkpointing.MODES,
        default="auto",
        help='activation checkpointing; auto: DeepSpeed\'s if the config has "activation_checkpointing", else off',
    )
    add("--eval-data", default=None, help="held-out text (same forms as --data): dense perplexity after training")
    add("--eval-rows", type=int, default=32, help="held-out rows of --seq-len tokens to evaluate (at most one pass)")
    add(
        "--eval-passkey",
        default=None,
        metavar="FILE",
        type=evaluate.answer_file_arg,
        help='.jsonl of {"prompt", "answer", "depth"}: dense teacher-forced answer accuracy after training',
    )
    add("--seed", type=int, default=0, help="seed of the data order, random init and LoRA init")
    add(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=(resume.AUTO,),
        help="continue from the latest complete checkpoint in OUTPUT_DIR/checkpoints; "
        "'--resume auto': the same, or start fresh if there is none",
    )
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--no-save", action="store_true", help="write no checkpoint at all (benchmarks)")
    add(
        "--keep-checkpoints",
        type=int,
        default=3,
        metavar="N",
        help="keep the newest N complete checkpoints, never the one 'latest' names (0: keep all; default 3)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir that holds an earlier run, deleting its metrics, summary and checkpoints",
    )
    add("--log-every", type=int, default=1, help="refresh the progress bar's numbers every N steps")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)
    for name in ("seq_len", "max_steps", "log_every", "eval_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lora_r < 0 or args.save_every < 0 or args.keep_checkpoints < 0:
        parser.error("--lora-r, --save-every and --keep-checkpoints must be 0 or more")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts over and --resume continues: give one of them")
    return args


# ---- build ---------------------------------------------------------------------------------------------


class Run:
    """Everything the loop needs; ``build`` fills it in."""


def build(args: argparse.Namespace) -> Run:
    """Check every input, then start the job: distributed group, model, engine, data."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launch_env.default_single_process_env()
    run = check_inputs(args)
    ds_config = run.ds_config

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    run.rank, run.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    launch_env.set_cpu_threads(run.device_type)
    run.log = _rank0_printer(run.rank)
    run.log(f"corpus: {data.describe_corpus(args.data, run.files)}")
    if run.precision_note:
        run.log(run.precision_note)

    # -- model: partitioned as it is built under ZeRO-3; checkpointing and LoRA before the lemo conversion ---
    run.zero3_handle = model.zero3_context(ds_config)  # must stay alive while the model is built
    net = model.build_model(run.source, run.dtype, args.seed)
    checkpointing.configure_activation_checkpointing(net, ds_config, run.grad_ckpt)
    if args.lora_r > 0:
        net = model.add_lora(net, args.lora_r, args.seed)
    total, trainable = model.count_parameters(net)
    run.log(
        f"model: {args.model} ({run.source.config.model_type}, {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable), {str(run.dtype).removeprefix('torch.')}, "
        f"activation checkpointing {run.grad_ckpt}"
    )

    # lemo_ds.initialize = deepspeed.initialize after converting the sparse layers ("lemo" section, if any).
    config = {**ds_config, **({"lemo": run.lemo_section} if run.lemo_section is not None else {})}
    params = [p for p in net.parameters() if p.requires_grad]
    mpu = parallel.setup(run, net)  # Ulysses sequence parallelism when the config's sequence_parallel_size > 1
    run.engine, _, _, _ = lemo_ds.initialize(model=net, model_parameters=params, config=config, mpu=mpu)
    run.controller = lemo_ds.get_controller(run.engine)
    # The rows are packed: the dense job attends within documents without [s, s] masks too, as apply_lemo does.
    lemo_ds.enable_document_attention(net)
    if run.controller is not None:
        run.log(f"lemo: keep ratio per layer {run.controller.target_ratios}, scorer {run.lemo.scorer}")
    else:
        run.log("lemo: off (dense training)")

    # -- data, from step 0 or from the checkpoint's step and data position ------------------------------------
    run.start_step, start_row = 0, 0
    if args.resume:
        state = resume.load(run.engine, run.ckpt_dir, args, run.log)  # None: --resume auto found nothing
        # From here on args.resume says whether this run continues a checkpoint (metrics.jsonl, summary).
        args.resume = state is not None
        if state is not None:
            run.start_step, start_row = state["step"], state["rows_consumed"]
    run.rows_per_step = run.dp_size * run.micro_batch * run.grad_accum  # an SP group shares its rows
    rows = data.packed_rows(run.files, run.tokenizer, args.seq_len, args.seed, start=start_row)
    run.batches = parallel.rank_batches(run, rows, run.engine.device)
    # Predictors without a file: trained on this rank's first micro-batches (model frozen, oracle labels), read
    # from a second iterator so that training still sees exactly the rows it would have seen.
    first_rows = data.packed_rows(run.files, run.tokenizer, args.seq_len, args.seed, start=start_row)
    first = data.rank_batches(first_rows, rank=run.rank, world_size=run.world_size, micro_batch=run.micro_batch)
    predictor_job.calibrate_before_training(run.engine, first, run.lemo, run.engine.device, run.log)

    run.metrics = run.wandb = None
    if run.rank == 0:
        metrics_path = Path(args.output_dir) / "metrics.jsonl"
        run.metrics = metrics.MetricsLog(metrics_path, resume_step=run.start_step if args.resume else None)
        run.wandb = tracking.WandbLogger(ds_config, vars(args)) if run.use_wandb else None
    return run


def check_inputs(args: argparse.Namespace) -> Run:
    """Every check of the input, before any collective: local, deterministic work only, so every rank reaches
    the same verdict and a bad input stops them all (TrainingSetupError, LemoConfigError, ...)."""
    from deepspeed.accelerator import get_accelerator

    run = Run()
    run.args = args
    run.device_type = get_accelerator().device_name()
    raw = flags.apply_flag_overrides(
        load_ds_config(args.deepspeed), lr=args.lr, predictor=args.predictor, config_path=args.deepspeed,
        max_steps=args.max_steps,
    )
    lemo_config, ds_config = split_ds_config(raw)  # validates the "lemo" section
    ds_config, run.dtype, precision_note = precision.resolve_precision(ds_config, run.device_type)
    run.lemo = lemo_config if lemo_config is not None and lemo_config.enabled else None
    run.micro_batch = flags.micro_batch_size(ds_config)
    flags.require_optimizer(ds_config)
    run.grad_accum = int(ds_config.get("gradient_accumulation_steps", 1))
    run.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    run.source = model.resolve_model(args.model)
    if run.lemo is not None:
        lemo_ds.policies.check_supported(run.source.config.model_type)
        scorer = build_scorer(run.lemo)  # an unavailable scorer or a bad predictors file fails here, not mid-build
        if hasattr(scorer, "bind"):
            scorer.bind(run.source.config)  # a predictors file made for another model fails here too
        if args.seq_len < run.lemo.block_size:
            raise TrainingSetupError(
                f"--seq-len {args.seq_len} is shorter than one lemo block (block_size {run.lemo.block_size}); "
                f"use --seq-len {run.lemo.block_size} or more, or a smaller lemo.block_size"
            )
    run.tokenizer = ByteTokenizer() if run.source.kind == "preset" else load_hf_tokenizer(args.model)
    if run.tokenizer.vocab_size > run.source.config.vocab_size:
        raise TrainingSetupError(
            f"--model {args.model}: the tokenizer has {run.tokenizer.vocab_size} ids, the model's vocabulary "
            f"{run.source.config.vocab_size}; use the tokenizer the model was trained with"
        )
    run.files = data.discover_files(args.data)
    data.check_corpus(run.files, run.tokenizer, args.seq_len, args.data)
    run.eval_files = None
    if args.eval_data is not None:
        run.eval_files = data.discover_files(args.eval_data, flag="--eval-data")
        data.check_corpus(run.eval_files, run.tokenizer, args.seq_len, args.eval_data, flag="--eval-data")
    out = Path(args.output_dir)
    run.ckpt_dir = out / output_dir.CHECKPOINTS
    if args.resume is True:  # --resume auto may find nothing, and then starts fresh
        resume.require_checkpoint(run.ckpt_dir)
    if args.resume:
        resume.require_world_size(run.ckpt_dir, int(os.environ.get("WORLD_SIZE", "1")))
    elif args.overwrite:
        if int(os.environ.get("RANK", "0")) == 0:  # the other ranks write none of it; they do not look
            output_dir.clear_earlier_run(out)
    else:
        output_dir.refuse_earlier_run(out)
    output_dir.require_writable(out)
    if not args.no_save:
        output_dir.require_writable(run.ckpt_dir)
    run.use_wandb = tracking.prepare_wandb(ds_config, args.output_dir)
    run.grad_ckpt = checkpointing.resolve_mode(args.grad_ckpt, ds_config)
    run.ds_config, run.precision_note = ds_config, precision_note
    run.lemo_section = raw.get("lemo")
    parallel.check(run, args, ds_config)
    return run


# ---- train ---------------------------------------------------------------------------------------------


def train(run: Run) -> None:
    args, engine = run.args, run.engine
    tokens_per_step = run.rows_per_step * args.seq_len  # all ranks together
    mem_label = "cuda peak" if run.device_type == "cuda" else "peak RSS"
    bar = tqdm(total=args.max_steps, initial=run.start_step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    totals = metrics.RunTotals()
    started = time.perf_counter()
    engine.train()
    if run.controller is not None:
        run.controller.reset_stats()

    step, recall_note = run.start_step, ""
    for step in range(run.start_step + 1, args.max_steps + 1):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves on inside engine.step)
        loss_sum = torch.zeros((), device=engine.device)
        for _ in range(run.grad_accum):  # engine.step() only updates at the accumulation boundary
            batch = {k: v.to(engine.device) for k, v in next(run.batches).items()}  # [b, s] each
            loss, reported = parallel.forward_loss(run, engine, batch)
            engine.backward(loss)
            engine.step()
            loss_sum += reported.float()
        # One all-reduce: loss and per-layer keep ratios [1 + L], averaged over the data-parallel ranks, so
        # every rank reports the same numbers.
        reduced = torch.cat([loss_sum.reshape(1) / run.grad_accum, _keep_ratios(run).to(engine.device)])
        torch.distributed.all_reduce(reduced)
        loss_value, *keep_per_layer = (reduced / run.world_size).tolist()
        if not math.isfinite(loss_value):
            stop_on_nonfinite_loss(run, step, loss_value, lr)  # every rank: they all see the same reduced loss
        step_s = time.perf_counter() - t0
        mean_keep = sum(keep_per_layer) / len(keep_per_layer)
        # A process's first step pays for warm-up (allocation, lazy init): throughput leaves it out.
        warm = step > run.start_step + 1 or args.max_steps == run.start_step + 1
        totals.add(loss_value, keep_per_layer, tokens_per_step, step_s, timed=warm)

        if args.save_every and step % args.save_every == 0 and not args.no_save:
            resume.save(engine, run.ckpt_dir, step, step * run.rows_per_step, args, keep=args.keep_checkpoints)
        refreshed = predictor_job.refresh_record(engine)  # online refresh of the predictors: recall (all ranks)
        recall_note = f" | recall {refreshed['predictor_recall']:.3f}" if refreshed else recall_note
        if run.rank == 0:
            peak, _ = metrics.peak_memory(run.device_type)
            record = {"step": step, "loss": loss_value, "tokens": tokens_per_step, "step_time_s": step_s,
                      "tokens_per_s": tokens_per_step / step_s, "lr": lr, "mean_keep_ratio": mean_keep,
                      "keep_ratio_per_layer": keep_per_layer, "peak_mem_bytes": peak, **refreshed}  # fmt: skip
            run.metrics.write(record)
            if run.wandb is not None:
                run.wandb.log(record)
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                bar.set_postfix_str(
                    f"loss {loss_value:.4f} | {tokens_per_step / step_s:,.0f} tok/s | keep {mean_keep:.2f} | "
                    f"{mem_label} {metrics.format_bytes(peak)}{recall_note}"
                )
    bar.close()

    if not args.no_save and step > run.start_step and not (args.save_every and step % args.save_every == 0):
        resume.save(engine, run.ckpt_dir, step, step * run.rows_per_step, args, keep=args.keep_checkpoints)
    if totals.steps == 0:
        run.log(f"nothing to train: the run is at step {step} and --max-steps is {args.max_steps}")
        return
    evaluation = heldout_evaluation(run)
    if args.eval_passkey is not None:
        evaluation.update(evaluate.passkey_evaluation(run.engine, args.eval_passkey, run.tokenizer, run.log))
    if run.rank == 0:
        summary = {**_summary(run, step, totals, time.perf_counter() - started), **evaluation}
        metrics.write_json_atomic(Path(args.output_dir) / "summary.json", summary)
        loss, keep = summary["final_loss"], summary["mean_keep_ratio"]
        run.log(
            f"done: step {step}, loss {'n/a' if loss is None else f'{loss:.4f}'}, "
            f"{summary['tokens_per_s']:,.0f} tok/s, mean keep ratio {'n/a' if keep is None else f'{keep:.3f}'}; "
            f"wrote {Path(args.output_dir) / 'summary.json'}"
        )


def stop_on_nonfinite_loss(run: Run, step: int, loss_value: float, lr: float) -> None:
    """A NaN/inf loss: the weights are (or are about to be) ruined, so stop before anything saves them. The
    step's record says so in strict JSON (loss null)."""
    if run.rank == 0:
        run.metrics.write({"step": step, "loss": None, "loss_nonfinite": str(loss_value), "lr": lr})
    raise TrainingStopped(
        f"the loss is {loss_value} at step {step}; stopped without saving ({resume.latest_note(run.ckpt_dir)}); "
        "lower --lr (or check the data), then continue with --resume"
    )


def heldout_evaluation(run: Run) -> dict:
    """With --eval-data: dense perplexity on the held-out rows and, with the predictor scorer, the predictors'
    recall against the oracle on the same rows (every rank takes part; rank 0 logs)."""
    if run.eval_files is None:
        return {}
    args = run.args

    def batches():
        rows = data.heldout_rows(run.eval_files, run.tokenizer, args.seq_len, args.seed, limit=args.eval_rows)
        return data.rank_batches(rows, rank=run.rank, world_size=run.world_size, micro_batch=run.micro_batch)

    started = time.perf_counter()
    result = evaluate.heldout_perplexity(run.engine, batches())
    if run.lemo is not None and run.lemo.scorer == "predictor":
        result.update(evaluate.heldout_recall(run.engine, batches()))
    recall = f", predictor recall {result['predictor_recall']:.3f}" if "predictor_recall" in result else ""
    run.log(
        f"held-out: {result['eval_tokens']:,} tokens, loss {result['eval_loss']:.4f}, perplexity "
        f"{result['eval_ppl']:.3f}{recall} (dense evaluation, {time.perf_counter() - started:.1f} s)"
    )
    return result


def _keep_ratios(run: Run) -> torch.Tensor:
    """Measured kept-token share per decoder layer since the last call: [L] (all 1.0 without lemo)."""
    return metrics.take_keep_ratios(run.controller, run.source.config.num_hidden_layers)


def _summary(run: Run, step: int, totals: metrics.RunTotals, elapsed: float) -> dict:
    args = run.args
    peak, kind = metrics.peak_memory(run.device_type)
    return {
        "steps": step,
        "steps_this_run": totals.steps,
        "final_loss": totals.final_loss,
        "tokens_per_s": totals.tokens_per_s,  # all ranks' tokens, first step of this process left out
        "peak_mem_bytes": peak,  # rank 0's
        "peak_mem_kind": kind,
        "mean_keep_ratio": totals.mean_keep_ratio,
        "keep_ratio_per_layer": totals.keep_ratio_per_layer,
        "world_size": run.world_size,
        "sequence_parallel_size": run.sp_size,
        "zero_stage": run.zero_stage,
        "model": args.model,
        "model_type": run.source.config.model_type,
        "seq_len": args.seq_len,
        "micro_batch": run.micro_batch,
        "grad_accum": run.grad_accum,
        "lora_r": args.lora_r,
        "scorer": run.lemo.scorer if run.lemo is not None else None,
        "dtype": str(run.dtype).removeprefix("torch."),
        "grad_ckpt": run.grad_ckpt,
        "device": run.device_type,
        "resumed_from_step": run.start_step if args.resume else None,
        "elapsed_s": elapsed,
        "command": " ".join(sys.argv),
    }


def _rank0_printer(rank: int):
    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(f"lemo_ds: {message}", file=sys.stdout)
            sys.stdout.flush()

    return log


# ---- close ---------------------------------------------------------------------------------------------


def close(run: Run) -> None:
    if run.wandb is not None:
        run.wandb.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = build(args)
        train(run)
    except LemoError as error:
        # Bad input: one line, no traceback. Every rank gets here on its own, before any collective.
        message = ""
        for line in filter(None, (part.strip() for part in str(error).splitlines())):
            message += line if not message else (" " if message.endswith(":") else "; ") + line
        print(f"lemo_ds: error: {message}", file=sys.stderr, flush=True)
        return getattr(error, "exit_code", 2)
    finally:
        launch_env.release_cpu_comm_buffer()  # DeepSpeed's CPU backend leaks it otherwise (see there)
    close(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
