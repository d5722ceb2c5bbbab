"""The controller: per-model state of token elimination (schedule, counters, measured keep ratios).

One controller hangs off the Hugging Face model that ``apply_lemo`` converted (``get_controller(model)``).
It knows the optimizer step (it follows a DeepSpeed engine bound by ``lemo_ds.initialize``, a Hugging Face
Trainer's global step through ``lemo_ds.integrations.transformers``, or is set by hand with ``set_step``), counts
model forwards (a key for the random scorer and the selection cache), turns the schedule into each layer's current
keep ratio, and accumulates the share of tokens each layer really kept. A config that works by step on a controller
nobody drives is refused after the first optimizer step (``lemo_ds.step_guard``).

Step hooks (``add_step_hook``) run once each time the controller sees the optimizer step move, i.e. after an optimizer
step and outside any forward of a layer: the predictor scorer trains its predictors there. Where the controller sees
it depends on the driver: ``set_step`` (a loop of one's own, called after ``optimizer.step()``); ``poll_step``, which
reads the step source of ``follow`` and which the Hugging Face callback calls right after the Trainer's optimizer step
(``on_step_end``); else the next forward of the model (``on_model_forward``, the DeepSpeed engine's case, whose
``global_steps`` moves inside ``engine.step()``). Every data-parallel rank sees the step move at the same point of
its loop, so collectives in a hook line up across ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lemo_ds import step_guard
from lemo_ds.config import LemoConfig


class LemoController:
    def __init__(self, config: LemoConfig, target_ratios: list[float]) -> None:
        self.config = config
        self.target_ratios = target_ratios  # per decoder layer; 1.0 = dense
        self.step = 0
        self.micro_step = 0
        self._step_source: Callable[[], int] | None = None
        self.driven = False  # something tells this controller the optimizer step (follow / set_step)
        self._step_hooks: OrderedDict[int, Callable[[int], None]] = OrderedDict()
        self._kept = [0] * len(target_ratios)
        self._seen = [0] * len(target_ratios)
        # This forward's selections (training forwards only; a checkpoint's recompute reuses its selection):
        self.processed_rows: torch.Tensor | None = None  # [b, s] bool: the row ran through every sparse layer
        self.last_kept_blocks: torch.Tensor | None = None  # [b, k] the latest sparse layer's kept blocks
        # The caller keeps every layer's output (output_hidden_states): no layer may overwrite its input in place.
        self.keeps_layer_outputs = False
        if self.needs_steps():
            step_guard.watch(self)

    # ---- time ---------------------------------------------------------------------------------------

    def follow(self, step_source: Callable[[], int]) -> None:
        """Read the optimizer step from ``step_source()`` before every forward of the model (the one way any
        training loop's step reaches the schedule and the predictor refresh)."""
        self._step_source = step_source
        self.driven = True

    def bind_engine(self, engine: Any) -> None:
        """Follow ``engine.global_steps`` (the optimizer steps DeepSpeed has taken)."""
        self.follow(lambda: engine.global_steps)

    def set_step(self, step: int) -> None:
        """The optimizer steps taken so far; call it after every ``optimizer.step()`` (the step hooks run here)."""
        self.driven = True
        self._advance(int(step))

    def poll_step(self) -> None:
        """Read the step source of ``follow`` now (the step hooks run if it moved): where a driver knows the
        optimizer step was just taken, before the next forward of the model would read it."""
        if self._step_source is not None:
            self._advance(int(self._step_source()))

    def add_step_hook(self, hook: Callable[[int], None]) -> RemovableHandle:
        """Call ``hook(step)`` each time the controller sees the optimizer step move to ``step`` (see the module
        docstring); hooks run in the order they were added. Returns a handle whose ``remove()`` drops the hook."""
        handle = RemovableHandle(self._step_hooks)
        self._step_hooks[handle.id] = hook
        return handle

    def _advance(self, step: int) -> None:
        if step == self.step:
            return
        self.step = step
        for hook in list(self._step_hooks.values()):
            hook(step)

    def needs_steps(self) -> bool:
        """Whether this config does anything by optimizer step: a dense phase or ramp of the keep ratios, or
        predictors that train during training (an online refresh, or calibration on the fly without a predictors
        file), which they do in a step hook. Such a controller must be told the step (``step_guard``)."""
        schedule = self.config.schedule
        predictor = self.config.predictor
        has_sparse = any(ratio < 1.0 for ratio in self.target_ratios)  # else no predictor exists to train
        trains = has_sparse and self.config.scorer == "predictor" and (
            predictor.refresh_every > 0 or (self.config.predictor_path is None and predictor.calibration_batches > 0)
        )
        return self.config.enabled and (schedule.dense_steps > 0 or schedule.ramp_steps > 0 or trains)

    def on_model_forward(self, keeps_layer_outputs: bool = False, training: bool = True) -> None:
        """Called before every forward of the model (by the converted causal LM's forward, ``lemo_ds.causal_lm``; on
        Megatron by the pre-hook of ``attach_lemo``)."""
        step_guard.check(self, training)
        self.poll_step()
        self.micro_step += 1
        self.processed_rows = self.last_kept_blocks = None
        self.keeps_layer_outputs = keeps_layer_outputs

    def note_selection(self, blocks: torch.Tensor, rows: torch.Tensor, seq: int) -> None:
        """A sparse layer of this forward kept ``blocks`` [b, k] = token ``rows`` [b, K] of ``seq``."""
        kept = torch.zeros(rows.shape[0], seq, dtype=torch.bool, device=rows.device)  # [b, s]
        kept.scatter_(1, rows, True)
        self.processed_rows = kept if self.processed_rows is None else self.processed_rows & kept
        self.last_kept_blocks = blocks

    # ---- the schedule -------------------------------------------------------------------------------

    def schedule_factor(self) -> float:
        """1.0 while dense, then linearly down to 0.0 over the ramp: ratio = target + (1 - target) * factor."""
        schedule = self.config.schedule
        if self.step < schedule.dense_steps:
            return 1.0
        if schedule.ramp_steps == 0:
            return 0.0
        return max(0.0, 1.0 - (self.step - schedule.dense_steps) / schedule.ramp_steps)

    def keep_ratio(self, layer_index: int, training: bool) -> float:
        target = self.target_ratios[layer_index]
        if not self.config.enabled or target >= 1.0 or (not training and not self.config.apply_in_eval):
            return 1.0
        factor = self.schedule_factor()
        return target + (1.0 - target) * factor

    # ---- measurement --------------------------------------------------------------------------------

    def record(self, layer_index: int, kept_tokens: int, tokens: int) -> None:
        self._kept[layer_index] += kept_tokens
        self._seen[layer_index] += tokens

    def record_dense(self, tokens: int) -> None:
        """Dense layers are not converted; count their tokens once per forward for the per-layer table."""
        for index, target in enumerate(self.target_ratios):
            if target >= 1.0:
                self.record(index, tokens, tokens)

    def has_stats(self) -> bool:
        """Whether any training forward was measured since the last reset."""
        return any(self._seen)

    def stats(self) -> dict[str, Any]:
        """Measured share of tokens each layer processed since the last reset (1.0 before any forward)."""
        per_layer = [kept / seen if seen else 1.0 for kept, seen in zip(self._kept, self._seen, strict=True)]
        return {"mean_keep_ratio": sum(per_layer) / len(per_layer), "keep_ratio_per_layer": per_layer}

    def reset_stats(self) -> None:
        self._kept = [0] * len(self.target_ratios)
        self._seen = [0] * len(self.target_ratios)
