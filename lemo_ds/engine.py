"""``lemo_ds.initialize``: ``deepspeed.initialize`` with the "lemo" section applied first."""

from __future__ import annotations

import copy
from typing import Any

import deepspeed

from lemo_ds import sequence_parallel
from lemo_ds.config import LemoConfig, parse_lemo_config, split_ds_config
from lemo_ds.ds_auto import fill_auto
from lemo_ds.errors import LemoConfigError
from lemo_ds.inject import apply_lemo, get_controller

# DeepSpeed's default "reduce_bucket_size" (elements), which ZeRO-2 and ZeRO-3 allocate whole, on the device, for the
# contiguous gradient buffer (5e8 elements: 0.93 GiB in bf16) whatever the number of trainable parameters.
DEEPSPEED_REDUCE_BUCKET = 500_000_000


def size_gradient_buckets(ds_config: dict[str, Any], parameters: Any) -> dict[str, Any]:
    """``ds_config`` with ZeRO's gradient bucket no larger than the trainable parameters, where the config leaves
    its size to DeepSpeed.

    ZeRO-2 and ZeRO-3 allocate their contiguous gradient buffer at its full size before the first step; under LoRA
    (a few million trainable elements) all but a sliver of it stays unused. A bucket that holds every trainable
    parameter reduces exactly as the default one does when they fit in it (once, at the end of backward), so the
    communication is unchanged on any number of ranks: only the unused part of the buffer goes. A size the user
    set is kept."""
    zero = ds_config.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (2, 3) or "reduce_bucket_size" in zero or not zero.get("contiguous_gradients", True):
        return ds_config
    flat = [p for item in parameters for p in (item["params"] if isinstance(item, dict) else [item])]
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in flat if p.requires_grad)
    if trainable >= DEEPSPEED_REDUCE_BUCKET or trainable == 0:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": int(trainable)}}


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    config_params: Any = None,
    lemo_config: LemoConfig | None = None,
    lemo_scorer: Any = None,
    **kwargs: Any,
) -> tuple:
    """Same arguments and return value as ``deepspeed.initialize``.

    The DeepSpeed config comes from ``config`` (a dict or a path), ``config_params``, or
    ``args.deepspeed_config``, as deepspeed reads it. Its "lemo" section is validated and applied to
    ``model`` (``apply_lemo``), removed from what DeepSpeed sees, and the model's controller is bound to the
    engine so the keep-ratio schedule follows ``engine.global_steps``. Its ``"auto"`` batch size, optimizer and
    warm-up values, which DeepSpeed does not fill (the Hugging Face Trainer does), get launch/train.py's values
    (``lemo_ds.ds_auto``), so the shipped configs work here as they are.

    ``lemo_config``: the "lemo" section already parsed (``split_ds_config``), for a caller that validated it before
    (launch/train.py); the DeepSpeed config then holds none. ``lemo_scorer``: the scorer already built from it
    (``lemo_ds.scorers.build_scorer``), so that a predictors file is read once; default: apply_lemo builds it.
    """
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if source is not None:
        section, ds_config = split_ds_config(source)
        if section is not None and lemo_config is not None:
            raise LemoConfigError(
                'lemo_ds.initialize: a "lemo" section in the DeepSpeed config and lemo_config too; give one of them'
            )
        lemo_config = lemo_config if lemo_config is not None else section
        if args is not None and getattr(args, "deepspeed_config", None) is not None:
            # deepspeed refuses a config given both in args and as an argument: hand it ours alone.
            args = copy.copy(args)
            args.deepspeed_config = None
        config, config_params = fill_auto(ds_config), None
    lemo_config = parse_lemo_config(lemo_config)  # once: the checks below and apply_lemo take the same object
    if lemo_config is not None:
        if isinstance(config, dict):  # before apply_lemo, on every rank alike
            sp = sequence_parallel.sp_size_from_config(config)
            sequence_parallel.check_loss_tokens(lemo_config, sp)
        apply_lemo(model, lemo_config, scorer=lemo_scorer)
    if isinstance(config, dict):
        if model_parameters is not None and not isinstance(model_parameters, (list, tuple)):
            model_parameters = list(model_parameters)  # a generator: read once here, handed on as a list
        config = size_gradient_buckets(config, model.parameters() if model_parameters is None else model_parameters)
    result = deepspeed.initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=config,
        config_params=config_params,
        **kwargs,
    )
    controller = get_controller(model)
    if controller is not None:
        controller.bind_engine(result[0])
    return result
