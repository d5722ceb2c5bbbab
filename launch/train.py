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
(lemo_ds.ds_auto). An error is one line "lemo_ds: error: ..." on stderr and an exit status: 2 for bad input, an
OUTPUT_DIR holding an earlier run (without --resume or --overwrite) or one that cannot be written; 3 for a stop of
the run itself, a NaN/inf loss or a save the disk refuses, nothing bad saved; 4 for a node that dies or is cut off.
The modules below say more.

This file parses the flags and runs the job; its parts are in lemo_ds/training/: parse -> describe (job.py: the
Job, every check, before anything heavy) -> start (runtime.py: the Runtime: distributed group, model, engine, data)
-> train (loop.py) -> close (runtime.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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

from lemo_ds.errors import LemoError, print_error_line  # noqa: E402
from lemo_ds.training import ds_output, evaluate, flags, launch_env, resume  # noqa: E402
from lemo_ds.training.job import describe, memory_size  # noqa: E402
from lemo_ds.training.loop import train  # noqa: E402
from lemo_ds.training.runtime import close, start  # noqa: E402

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
        print_error_line(error)
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
