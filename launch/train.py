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

    # continue after a NaN stop at a lower learning rate (the checkpoint's own rate is replaced from the next step)
    deepspeed launch/train.py --deepspeed ds_configs/zero3_lemo.json --max-steps 40 --resume --lr 1e-4

    # one process, without the launcher
    python launch/train.py --deepspeed ds_configs/zero3_lemo.json --max-steps 3

It writes OUTPUT_DIR/metrics.jsonl (one line per step), OUTPUT_DIR/summary.json (at the end, or at a stop),
DeepSpeed checkpoints under OUTPUT_DIR/checkpoints/step{N} (the newest --keep-checkpoints of them) and
OUTPUT_DIR/deepspeed.log (what DeepSpeed logs or prints, and third-party warnings; --verbose prints them instead).
The config's "auto" batch, optimizer and warm-up values (there for the Hugging Face Trainer) get the job's defaults
(lemo_ds.ds_auto). Bad input (a bad flag value included), an OUTPUT_DIR holding an earlier run (without --resume
or --overwrite) or one that cannot be written stops every rank before any collective with one line
"lemo_ds: error: ..." on stderr and exit status 2 (an OUTPUT_DIR that some nodes cannot write: every rank, naming
them, once the process group is up, before training); a NaN/inf loss or weights, or a save the disk refuses, stop the
job with one line and exit status 3, nothing bad saved, and a summary.json with "status": "stopped"; a node that
dies or is cut off stops every other rank within 1.5 x --peer-timeout seconds with one line naming it, exit status 4
('latest' still names the last complete checkpoint). A folder whose run stopped before its first checkpoint takes
the same command again (its files are moved to OUTPUT_DIR/stopped_runs/ first); --lr on --resume sets the new rate
and says so in one line.

Shape of the job: parse -> describe (the Job: every check, before anything heavy) -> start (the Runtime: distributed
group, model, engine, data) -> train -> close.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout that was not pip-installed: import lemo_ds from here
    sys.path.insert(0, str(REPO))

# DeepSpeed logs from its import on (its accelerator detection, on every rank): the job holds those records until
# main() knows whether they print (--verbose) or go to OUTPUT_DIR/deepspeed.log (lemo_ds.training.ds_output). Only
# when run as the job: importing this module (the tests do) leaves DeepSpeed's logger alone.
_HELD_DEEPSPEED_RECORDS: list[logging.LogRecord] = []
if __name__ == "__main__":
    logging.getLogger("DeepSpeed").addFilter(_HELD_DEEPSPEED_RECORDS.append)  # None: not passed on, only held

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lemo_ds  # noqa: E402
from lemo_ds.config import LemoConfig, load_ds_config, split_ds_config  # noqa: E402
from lemo_ds.errors import LemoError  # noqa: E402
from lemo_ds.plan import job as plan_job  # noqa: E402
from lemo_ds.plan import refusal as plan_refusal  # noqa: E402
from lemo_ds.plan import search as plan_search  # noqa: E402
from lemo_ds.predictors import job as predictor_job  # noqa: E402
from lemo_ds.scorers import build_scorer  # noqa: E402
from lemo_ds.training import (  # noqa: E402
    checkpointing,
    data,
    ds_output,
    evaluate,
    flags,
    launch_env,
    metrics,
    model,
    output_dir,
    parallel,
    peers,
    precision,
    resume,
    sparsity,
    tracking,
)
from lemo_ds.training.errors import TrainingSetupError, TrainingStopped  # noqa: E402
from lemo_ds.training.parallel import ParallelDims  # noqa: E402
from lemo_ds.training.tokenizer import ByteTokenizer, load_hf_tokenizer  # noqa: E402

flags.silence_deprecated_collectives()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.job_parser(
        __doc__.split("\n\n")[0],
        output_dir="outputs/run",
        output_help="metrics.jsonl, summary.json, checkpoints/",
        grad_ckpt_help='activation checkpointing; auto: DeepSpeed\'s if the config has "activation_checkpointing", '
        "else off",
        seq_len_max=True,
    )
    add = parser.add_argument
    add("--predictor", default=None, help='trained predictors file (lemo scorer "predictor")')
    add("--eval-data", default=None, help="held-out text (same forms as --data): dense perplexity after training")
    add("--eval-rows", type=int, default=32,
        help="held-out rows of --seq-len tokens to evaluate (at most one pass; default: %(default)s)")  # fmt: skip
    add(
        "--eval-passkey",
        default=None,
        metavar="FILE",
        type=evaluate.answer_file_arg,
        help='.jsonl of {"prompt", "answer", "depth"}: dense teacher-forced answer accuracy after training',
    )
    add(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=(resume.AUTO,),
        help="continue from the latest complete checkpoint in OUTPUT_DIR/checkpoints; "
        "'--resume auto': the same, or start fresh if there is none",
    )
    add("--save-every", type=int, default=0, help="checkpoint every N steps (default 0: only at the end)")
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
    add(
        "--memory-check",
        choices=("on", "off"),
        default="on",
        help="before loading weights, stop a job the memory planner predicts does not fit, naming a plan that does "
        "(python -m lemo_ds.plan; default: %(default)s)",
    )
    add("--gpu-mem", type=memory_size, default=None,
        help="device memory the planner budgets, e.g. 80GiB (default: the GPU's, else RAM per rank)")  # fmt: skip
    add("--host-mem", type=memory_size, default=None,
        help="host memory the planner budgets, e.g. 128GiB (default: RAM per local rank)")  # fmt: skip
    add("--log-every", type=int, default=1, help="refresh the progress bar's numbers every N steps (default: 1)")
    add(
        "--peer-timeout",
        type=float,
        default=60,
        metavar="SECONDS",
        help="with several ranks: stop every rank, naming the node, when a rank has given no sign of life for this "
        "long (a node down, or cut off; lemo_ds.training.peers); 0: off (default: %(default)g)",
    )
    add(
        "--verbose",
        action="store_true",
        help=f"print DeepSpeed's own log lines and third-party warnings (default: OUTPUT_DIR/{ds_output.LOG_NAME})",
    )
    args = flags.parse_job_flags(
        parser,
        argv,
        at_least_one=("log_every", "eval_rows"),
        non_negative=("save_every", "keep_checkpoints", "peer_timeout"),
    )
    if args.overwrite and args.resume:
        parser.error("--overwrite starts over and --resume continues: give one of them")
    if args.seq_len == "max" and args.memory_check == "off":
        parser.error("--seq-len max asks the memory planner, which --memory-check off turns off: give a length")
    return args


def memory_size(text: str) -> int:
    try:
        return plan_search.parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ---- describe: the Job ---------------------------------------------------------------------------------


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
        raise TrainingSetupError(plan_refusal.refusal(result, gpu_mem, host_mem, seq, lemo_section))
    return seq, note


def _stopped_before_first_checkpoint(out: Path, found: resume.Found) -> bool:
    """The folder's earlier run stopped (exit 3) before it had a complete checkpoint (``found``: its checkpoint
    folder's scan): nothing to continue, so a plain rerun starts over there (its files set aside, not deleted)
    instead of being refused."""
    return output_dir.stopped_run(out) is not None and found.tag is None


# ---- start: the Runtime --------------------------------------------------------------------------------


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
        write=lambda line: tqdm.write(line, file=sys.stderr),  # on a line of its own beside rank 0's progress bar
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


# ---- train ---------------------------------------------------------------------------------------------


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
    if job.lemo is not None and job.lemo.scorer == "predictor":
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


def _rank0_printer(rank: int) -> Callable[[str], None]:
    stream = sys.stdout  # this one: while DeepSpeed's prints go to its log (ds_output.stdout_to_log), lemo_ds's don't

    def log(message: str) -> None:
        if rank == 0:
            tqdm.write(f"lemo_ds: {message}", file=stream)
            stream.flush()

    return log


# ---- close ---------------------------------------------------------------------------------------------


def close(rt: Runtime | None) -> None:
    if rt is not None and rt.peer_watch is not None:
        rt.peer_watch.stop()  # before the group goes: ranks that end at different moments are not lost peers
    if rt is not None and rt.wandb is not None:
        rt.wandb.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    held = logging.getLogger(ds_output.DEEPSPEED_LOGGER)
    held.removeFilter(_HELD_DEEPSPEED_RECORDS.append)  # from here on, ds_output decides where DeepSpeed's lines go
    with ds_output.routed(args.verbose, held=_HELD_DEEPSPEED_RECORDS) as deepspeed_output:
        return run(args, deepspeed_output)


# Set by run: the job stopped with an error once the process group was up. Only then does the process leave through
# launch_env.exit_now (see __main__). An error before it (describe: every rank reaches the same verdict on its own)
# leaves through the interpreter's own exit: DeepSpeed's launcher ends the other ranks as soon as one exits, and a
# rank leaving at once took its siblings down before they printed their line (one line of two, CI).
_STOPPED_IN_GROUP = False


def run(args: argparse.Namespace, deepspeed_output: ds_output.DeepSpeedOutput) -> int:
    global _STOPPED_IN_GROUP
    rt, status = None, 0
    try:
        launch_env.default_single_process_env()
        job = describe(args)
        rt = start(job, deepspeed_output)
        train(job, rt)
    except LemoError as error:
        # One line, no traceback: bad input (every rank gets here on its own, before any collective), or a stop
        # every rank learnt of together (a non-finite loss, a failed save).
        message = ""
        for line in filter(None, (part.strip() for part in str(error).splitlines())):
            message += line if not message else (" " if message.endswith(":") else "; ") + line
        print(f"lemo_ds: error: {message}", file=sys.stderr, flush=True)
        status = getattr(error, "exit_code", 2)
        launch_env.exit_on_sigterm(status)  # srun ending the ranks after the first one out: the same status
        _STOPPED_IN_GROUP = torch.distributed.is_initialized()
    finally:
        launch_env.release_cpu_comm_buffer()  # DeepSpeed's CPU backend leaks it otherwise (see there)
    close(rt)  # also after a stop: a process that exits with its process group alive can abort on the way out
    return status


if __name__ == "__main__":
    exit_status = main()
    if exit_status and _STOPPED_IN_GROUP:  # an error's status (2, 3, 4) stays the process's: launch_env.exit_on_sigterm
        launch_env.exit_now(exit_status)
    sys.exit(exit_status)
