"""The training jobs' flags: the ones launch/train.py and launch/train_hf.py share, what they change in the
DeepSpeed config, and what the jobs read from it."""

from __future__ import annotations

import argparse
import copy
import math
import os
import warnings
from pathlib import Path
from typing import Any, NoReturn

from lemo_ds.ds_auto import fill_auto
from lemo_ds.training.checkpointing import MODES
from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.presets import DEFAULT_PRESET, PRESETS

# DeepSpeed schedulers whose rates come from their own parameters, not from the optimizer's lr: --lr cannot set them.
_OWN_RATE_SCHEDULERS = {"OneCycle": "cycle_min_lr/cycle_max_lr", "LRRangeTest": "lr_range_test_min_lr"}


def apply_flag_overrides(
    raw: dict[str, Any], *, lr: float | None, predictor: str | None, config_path: str, max_steps: int | None = None
) -> dict[str, Any]:
    """A copy of the config (with its "lemo" section) with ``--lr`` (the optimizer's rate and the warm-up
    peak), ``--predictor`` (lemo scorer "predictor" reading that file) and ``--max-steps`` (a scheduler's
    ``total_num_steps: "auto"``, as in the Hugging Face integration) applied, then its other ``"auto"`` values
    filled with the job's defaults (lemo_ds.ds_auto: plain DeepSpeed does not fill them)."""
    raw = copy.deepcopy(raw)
    scheduler_params = (raw.get("scheduler") or {}).get("params", {})
    if lr is not None:
        scheduler_type = (raw.get("scheduler") or {}).get("type")
        if scheduler_type in _OWN_RATE_SCHEDULERS:
            raise TrainingSetupError(
                f"--lr {lr:g}: the {scheduler_type} scheduler of {config_path} sets the learning rate itself "
                f"({_OWN_RATE_SCHEDULERS[scheduler_type]}); change those in the config instead"
            )
        if isinstance(raw.get("optimizer"), dict):
            raw["optimizer"].setdefault("params", {})["lr"] = lr
        if "warmup_max_lr" in scheduler_params:
            scheduler_params["warmup_max_lr"] = lr
    if scheduler_params.get("total_num_steps") == "auto":
        if max_steps is None:
            raise TrainingSetupError(
                f'{config_path}: scheduler.params.total_num_steps is "auto" but the job has no step count; '
                "pass --max-steps or write the number in the config"
            )
        scheduler_params["total_num_steps"] = max_steps
    if predictor is not None:
        if not isinstance(raw.get("lemo"), dict):
            raise TrainingSetupError(
                f'--predictor needs a "lemo" section in the DeepSpeed config ({config_path} has none); '
                "use ds_configs/zero3_lemo.json or add one"
            )
        if not os.path.isfile(predictor):
            raise TrainingSetupError(f"--predictor {predictor}: no such file; give a trained predictors file")
        raw["lemo"].update(scorer="predictor", predictor_path=os.path.abspath(predictor))
    return fill_auto(raw)


def micro_batch_size(ds_config: dict[str, Any]) -> int:
    """train_micro_batch_size_per_gpu: the rows each rank packs into one micro-batch."""
    value = ds_config.get("train_micro_batch_size_per_gpu")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainingSetupError(
            "the DeepSpeed config must set train_micro_batch_size_per_gpu to a positive integer "
            f"(got {value!r}); the training job packs rows into micro-batches of that size"
        )
    return value


def require_optimizer(ds_config: dict[str, Any]) -> None:
    """The job lets DeepSpeed build the optimizer (and scheduler) from the config: it must name one, with a usable
    learning rate (torch would otherwise refuse it with a traceback once the engine is being built)."""
    if not isinstance(ds_config.get("optimizer"), dict):
        raise TrainingSetupError(
            'the DeepSpeed config has no "optimizer" section; add one, e.g. "optimizer": {"type": "AdamW", '
            '"params": {"lr": 2e-4, "torch_adam": true}} (see ds_configs/zero3_lemo.json)'
        )
    lr = (ds_config["optimizer"].get("params") or {}).get("lr")
    if lr is not None and not _is_positive_number(lr):
        raise TrainingSetupError(
            f"the DeepSpeed config's optimizer.params.lr is {lr!r}; it must be a positive number, e.g. 2e-4 "
            "(or pass --lr)"
        )


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def learning_rate(text: str) -> float:
    """``--lr``: a positive finite number (argparse type; a bad one is the parser's one-line error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not _is_positive_number(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate; give a positive number, e.g. 2e-4")
    return value


# ---- the flags launch/train.py and launch/train_hf.py share -----------------------------------------------------

# The launch scripts' default config, in the checkout they run from (each script imports lemo_ds from there).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_lemo.json"


def silence_deprecated_collectives() -> None:
    """DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates: one warning per call site per rank."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse with the jobs' error convention: one line "lemo_ds: error: ..." on stderr and exit status 2 (argparse
    prints its usage block first), so a bad flag reads like every other bad input of the job."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lemo_ds: error: {message} (see --help)\n")


def seq_len_or_max(text: str) -> int | str:
    """--seq-len of launch/train.py: a number of tokens, or "max" (the planner's longest length that fits)."""
    if text == "max":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of tokens nor max") from None


def job_parser(
    description: str, *, output_dir: str, output_help: str, grad_ckpt_help: str, seq_len_max: bool = False
) -> argparse.ArgumentParser:
    """The parser of a training job's common flags: config, model, data, sequence length, steps, output, LoRA,
    learning rate, activation checkpointing, seed (and the launcher's --local_rank). ``seq_len_max``: --seq-len
    also takes "max" (launch/train.py resolves it with the planner)."""
    parser = JobArgumentParser(description=description)
    add = parser.add_argument
    add(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        default=str(DEFAULT_CONFIG),
        metavar="CONFIG",
        help='DeepSpeed JSON config, with a "lemo" section or without (dense); default ds_configs/zero3_lemo.json',
    )
    add("--model", default=DEFAULT_PRESET, help=f"local Hugging Face model directory or a preset: {', '.join(PRESETS)}")
    add("--data", default=None, help='text file, .jsonl ("text" field) or folder; default: the Python stdlib')
    if seq_len_max:
        add("--seq-len", type=seq_len_or_max, default=1024,
            help="tokens per packed row, or max: the longest the planner says fits (default: %(default)s)")  # fmt: skip
    else:
        add("--seq-len", type=int, default=1024, help="tokens per packed row (default: %(default)s)")
    add("--max-steps", type=int, default=20, help="optimizer steps to train up to (default: %(default)s)")
    add("--output-dir", default=output_dir, help=f"{output_help} (default: %(default)s)")
    add("--lora-r", type=int, default=8, help="LoRA rank on q/k/v/o projections; 0 = full fine-tuning (default: "
        "%(default)s)")  # fmt: skip
    add("--lr", type=learning_rate, default=None,
        help='peak learning rate (default: the config\'s; 2e-4 where it says "auto")')  # fmt: skip
    add("--grad-ckpt", choices=MODES, default="auto", help=f"{grad_ckpt_help} (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the data order, random init and LoRA init (default: %(default)s)")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser


def parse_job_flags(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    at_least_one: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
) -> argparse.Namespace:
    """Parse, then check the numbers: --seq-len, --max-steps and ``at_least_one`` >= 1; --lora-r and
    ``non_negative`` >= 0 (names as attributes: "eval_rows")."""
    args = parser.parse_args(argv)
    for names, low, words in (
        (("seq_len", "max_steps", *at_least_one), 1, "at least 1"),
        (("lora_r", *non_negative), 0, "0 or more"),
    ):
        for name in names:
            if getattr(args, name) == "max":  # --seq-len max: resolved by the job
                continue
            if getattr(args, name) < low:
                parser.error(f"--{name.replace('_', '-')} must be {words}")
    return args
