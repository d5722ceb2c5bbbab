"""Misuse guard: a "lemo" schedule that works by optimizer step, on a model whose controller nobody steps.

A dense phase, a keep-ratio ramp or an online predictor refresh reads ``controller.step``, and the predictors
train (calibration on the fly, refresh) in the controller's step hooks. A training loop that never tells the
controller the step (no ``lemo_ds.initialize``, no ``lemo_ds.integrations.transformers``, no ``set_step``) would
leave the model dense, or its predictors untrained, for the whole run without a word. Nothing in the
model sees the optimizer, so this module watches every optimizer of the process (torch's global step hook):
once an optimizer has stepped after a training forward of the model, the next forward of the model raises
unless something drives the controller by then. Checking at the next forward, not in the hook, leaves a loop
that calls ``set_step`` right after ``optimizer.step()`` alone.

lemo_ds's own optimizers (the predictors', marked with ``INTERNAL_ATTR``) are not the model's and are ignored.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lemo_ds.errors import LemoConfigError

INTERNAL_ATTR = "_lemo_internal_optimizer"

# controller -> [trained since watched, an optimizer stepped after that]
_watched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_hook: Any = None


def watch(controller: Any) -> None:
    """Watch ``controller`` (one whose config needs the step) until something drives it."""
    global _hook
    _watched[controller] = [False, False]
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_after_optimizer_step)


def mark_internal(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An optimizer of lemo_ds itself (predictor training): its steps are not the model's."""
    setattr(optimizer, INTERNAL_ATTR, True)
    return optimizer


def check(controller: Any, training: bool) -> None:
    """Before every forward of the model: raise if an optimizer stepped after a training forward and the
    controller still follows no step."""
    state = _watched.get(controller)
    if state is None:
        return
    if controller.driven:
        del _watched[controller]  # driven once is driven for good: nothing more to watch
        return
    if state[1]:
        config = controller.config
        calibrates = config.scorer == "predictor" and config.predictor_path is None
        on_the_fly = ", predictors calibrated on the fly" if calibrates else ""
        raise LemoConfigError(
            "lemo: the model's optimizer stepped but its lemo controller does not know the step, and this lemo "
            f"section works by step (schedule dense_steps {config.schedule.dense_steps}, ramp_steps "
            f"{config.schedule.ramp_steps}, predictor refresh_every {config.predictor.refresh_every}{on_the_fly}): "
            "the model would stay dense, or its predictors untrained or never refreshed (they train after each "
            "optimizer step). With a Hugging Face Trainer call lemo_ds.integrations.transformers.enable(trainer); "
            "with DeepSpeed use lemo_ds.initialize; in a loop of your own call "
            "lemo_ds.get_controller(model).set_step(step) every step (or .follow(lambda: step_counter))"
        )
    if training:
        state[0] = True


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    if getattr(optimizer, INTERNAL_ATTR, False):
        return
    for controller, state in list(_watched.items()):
        if state[0] and not controller.driven:
            state[1] = True
