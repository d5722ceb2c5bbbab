"""lemo_ds for the Hugging Face ``Trainer`` (and its subclasses: TRL's ``SFTTrainer``, ...), in one line.

    from lemo_ds.integrations.transformers import enable

    args = TrainingArguments(..., deepspeed="ds_configs/zero3_lemo.json")  # the config you already pass
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    enable(trainer)  # reads its "lemo" section; or enable(trainer, config={"keep_ratio": 0.4}) without DeepSpeed
    trainer.train()

``enable`` converts the trainer's model (``lemo_ds.apply_lemo``; a model converted by hand is kept as it is) and
puts a ``LemoCallback`` first among the trainer's callbacks, which

- makes the lemo controller follow the Trainer's global step (``controller.follow``, the same mechanism
  ``lemo_ds.initialize`` uses for a DeepSpeed engine), so the "schedule" section and the predictors' online
  refresh run by optimizer step, and lets it see each step right after the optimizer took it (``on_step_end``:
  the predictors train there, on what the step's forwards queued);
- adds the measured keep ratios (``mean_keep_ratio``, ``keep_ratio_layer<i>``, averaged over the data-parallel
  ranks and the logging interval) and the predictors' refresh recall (``predictor_recall``...) to every training
  log, ahead of the reporting callbacks (wandb, tensorboard, ... through ``report_to``) and in
  ``trainer.state.log_history``.

Nothing else changes: gradient checkpointing, ZeRO through ``TrainingArguments(deepspeed=...)`` and
``DataCollatorWithFlattening`` (packed documents: their position ids restart at 0, which the "lemo_sdpa" attention
reads) work as usual, and checkpoints hold the ordinary model (the sparse layers change classes, not parameters).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from lemo_ds import distributed
from lemo_ds.config import LemoConfig
from lemo_ds.controller import LemoController
from lemo_ds.errors import LemoConfigError
from lemo_ds.inject import apply_lemo, get_controller
from lemo_ds.predictors.job import refresh_record
from lemo_ds.training.metrics import take_keep_ratios

__all__ = ["LemoCallback", "enable"]


def enable(trainer: Any, config: LemoConfig | dict[str, Any] | str | os.PathLike | None = None) -> Any:
    """Turn lemo on for ``trainer`` (a ``transformers.Trainer``); returns the trainer. Call it before ``train()``.

    ``config``: a DeepSpeed config (path or dict) with a "lemo" section, or the "lemo" section itself (a dict, or a
    LemoConfig already parsed); default
    the trainer's own ``TrainingArguments.deepspeed``. Without a "lemo" section (or with ``"enabled": false``) the
    model stays dense and nothing is added: a dense baseline is the same script with another config.
    """
    if trainer.model_wrapped is not trainer.model:
        raise LemoConfigError(
            "lemo_ds.integrations.transformers.enable: the trainer has already wrapped its model (DeepSpeed, DDP); "
            "call enable(trainer) right after building the Trainer, before trainer.train()"
        )
    if get_controller(trainer.model) is None:  # a model converted by hand (apply_lemo) keeps its conversion
        apply_lemo(trainer.model, config if config is not None else _deepspeed_config(trainer))
        if get_controller(trainer.model) is None:
            return trainer  # no "lemo" section: dense training
    callbacks = trainer.callback_handler.callbacks
    if not any(isinstance(callback, LemoCallback) for callback in callbacks):
        # First: the reporting callbacks (report_to) read the logs after on_log of the callbacks before them.
        callbacks.insert(0, LemoCallback())
    return trainer


def _deepspeed_config(trainer: Any) -> dict[str, Any] | str | os.PathLike:
    if trainer.args.deepspeed is None:
        raise LemoConfigError(
            'lemo_ds.integrations.transformers.enable: the trainer has no DeepSpeed config to read a "lemo" section '
            'from; pass TrainingArguments(deepspeed=<config with a "lemo" section>) or enable(trainer, config=...) '
            'with a config path, a config dict or the "lemo" section itself'
        )
    return trainer.args.deepspeed


class LemoCallback(TrainerCallback):
    """The Trainer side of lemo_ds (see the module docstring); ``enable`` adds it where it must be: first."""

    def __init__(self) -> None:
        self.controller: LemoController | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        controller = get_controller(model)
        if controller is None:
            raise LemoConfigError(
                "LemoCallback: the trainer's model has no lemo layers; build it with "
                "lemo_ds.integrations.transformers.enable(trainer), which also adds this callback"
            )
        controller.follow(lambda: state.global_step)  # the optimizer steps taken, restored on resume
        controller.reset_stats()  # forwards before training (calibration, evaluation) are not the run's
        self.controller = controller

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.poll_step()  # after the optimizer step, before on_log: the step hooks run here

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.controller is None or logs is None or "loss" not in logs:
            return  # only training logs carry keep ratios (evaluation is dense unless apply_in_eval)
        record = self._record(args, model)
        logs.update(record)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(record)  # Trainer.log appended a copy of logs before calling on_log

    def _record(self, args, model) -> dict[str, float]:
        """Keep ratios since the last log, averaged over the ranks (every rank logs together: Trainer.log follows
        a gather of the loss), and the predictors' refreshes since the last log."""
        controller = self.controller
        measured = controller.has_stats()
        keep = take_keep_ratios(controller, len(controller.target_ratios)).to(args.device)  # [L]
        counted = torch.tensor([float(measured)], device=args.device)
        reduced = torch.cat([keep * counted, counted])
        if distributed.initialized():
            torch.distributed.all_reduce(reduced)
        ranks = reduced[-1].item()
        record: dict[str, float] = {}
        if ranks > 0:
            per_layer = (reduced[:-1] / ranks).tolist()
            record["mean_keep_ratio"] = sum(per_layer) / len(per_layer)
            record.update({f"keep_ratio_layer{index}": value for index, value in enumerate(per_layer)})
        record.update(refresh_record(model))
        return record
