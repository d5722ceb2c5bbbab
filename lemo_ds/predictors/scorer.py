"""Predictor scorer: learned per-layer predictors estimate the oracle's block scores from the layer input.

The predictors (this package) come from a file (``predictor_path``, written by launch/train_predictor.py) or are
trained at the start of training (``lemo_ds.predictors.calibrate``, which launch/train.py runs when no file is
given). Inference is the fused kernel ``lemo_ds.kernels.predictor_scores`` (two launches per layer). A layer whose
predictor recalled less than the positional prior (the column length of each block, which every oracle score
carries) over its last observations is scored by that prior instead (``prefers_prior``).

``score`` only scores. Where a training micro-batch should also teach a predictor, it is selected by the oracle and
queued: a copy of the layer input (on the host where the layer runs on CUDA) and the oracle's labels, computed there
under no_grad while the layer's parameters are at hand (gathered, under ZeRO-3). The predictors train on the queue
in the controller's step hook (``attach``), after the optimizer step and outside any forward, so no activation
checkpoint sees their autograd graph. At most one input waits per layer, which bounds the queue's memory.

- Calibration on the fly: a layer that nobody calibrated (no file, no ``calibrate``) queues one training micro-batch
  per optimizer step until ``predictor.calibration_batches`` were queued, and is selected by the oracle meanwhile
  (one warning); an untrained layer is scored by the oracle.
- Online refresh (``predictor.refresh_every = K``): the first training micro-batch of every K-th optimizer step is
  selected by the oracle at every sparse layer and queued; after that step the predictor's recall on it is recorded
  (:meth:`PredictorScorer.pop_refresh_log`, under the step of the batch) and the predictor takes a few optimizer
  steps on it.

Gradients and recall are averaged over data-parallel ranks (``lemo_ds.predictors.trainer``): every rank queues the
same layers at the same steps and trains them in layer order in the same step hook, so the all-reduces match.

The bank of predictors is the scorer's, never a submodule of the model: ZeRO-3 does not partition it and the
model's optimizer does not see it. It moves to the layer input's device on first use and stays fp32. For the same
reason a DeepSpeed checkpoint does not hold it: ``save_checkpoint`` writes the scorer's whole state into a
checkpoint's folder (the bank as a predictors file, ``CHECKPOINT_BANK``, which ``predictor_path`` also reads, and the
training state, ``CHECKPOINT_STATE``) and ``load_checkpoint`` restores it, so a resumed job selects as the
uninterrupted one would (lemo_ds.training.resume).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lemo_ds.atomic_io import write_atomically
from lemo_ds.config import LemoConfig
from lemo_ds.controller import LemoController
from lemo_ds.core.selection import num_blocks
from lemo_ds.errors import LemoConfigError
from lemo_ds.kernels.predictor_scores import predictor_scores
from lemo_ds.policies import unwrap_model
from lemo_ds.predictors.fingerprint import check_fingerprint, model_fingerprint
from lemo_ds.predictors.io import load_predictors, save_predictors
from lemo_ds.predictors.labels import OracleLabels, lo_block_from_mask, oracle_labels
from lemo_ds.predictors.module import PredictorBank, PredictorDesign
from lemo_ds.predictors.trainer import Observation, PredictorTrainer, SelectionRule, positional_prior
from lemo_ds.score_context import ScoreContext

if TYPE_CHECKING:
    from lemo_ds.scorers.base import BlockScorer

CHECKPOINT_BANK = "lemo_predictors.safetensors"  # a predictors file (lemo_ds.predictors.io): --predictor reads it
CHECKPOINT_STATE = "lemo_predictors_state.pt"  # the training state of an exact continuation (torch.save)
_STATE_FORMAT = 1


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass
class QueuedInput:
    """A layer input waiting for the step hook, with what the predictor's training needs of it."""

    hidden_states: torch.Tensor  # [b, s, h] a copy of the layer input, on the host where the layer runs on CUDA
    ready: torch.cuda.Event | None  # recorded after the copy to the host; None: no CUDA copy
    labels: OracleLabels  # the oracle's, on the layer's device
    updates: int  # optimizer steps of the predictor on it
    refresh_step: int | None  # the optimizer step of an online refresh; None: calibration on the fly

    @staticmethod
    def hold(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A copy of ``hidden_states`` [b, s, h] that outlives the layer's in-place write-back: on the host (pinned,
        copied asynchronously) for a CUDA input, so the queue takes no device memory across the backward."""
        if hidden_states.device.type != "cuda":
            return hidden_states.clone(), None
        host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=True)  # [b, s, h]
        host.copy_(hidden_states, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def hidden_on(self, device: torch.device) -> torch.Tensor:
        """[b, s, h] on ``device``, ordered after the copy to the host."""
        if self.ready is not None:
            torch.cuda.current_stream(device).wait_event(self.ready)
        return self.hidden_states.to(device, non_blocking=True)


class PredictorScorer:
    name = "predictor"

    def __init__(self, config: LemoConfig, oracle: BlockScorer) -> None:
        """``oracle``: the scorer of untrained layers and of the micro-batches a predictor learns from (the oracle
        scorer, given by ``lemo_ds.scorers.build_scorer``)."""
        self.config = config
        self.settings = config.predictor
        self.design = PredictorDesign(self.settings.hidden_rank, self.settings.out_rank, self.settings.distance_buckets)
        self.bank: PredictorBank | None = None
        self.meta: dict[str, Any] | None = None
        self.trained: set[int] = set()  # layers whose predictor has been trained (from the file, or observed)
        self.prior_layers: set[int] = set()  # from a file: layers its writer found better served by the prior
        if config.predictor_path is not None:
            self.bank, self.meta = load_predictors(config.predictor_path)
            self.design = self.bank.design
            self.trained = set(self.bank.layers)
            self.prior_layers = set(self.meta.get("prior_layers", []))
        self.trainer: PredictorTrainer | None = None
        self.fingerprint: dict[str, Any] | None = None
        self.controller: LemoController | None = None
        self.refresh_log: list[dict[str, float]] = []
        self.queue: dict[int, QueuedInput] = {}  # by layer: the input its predictor trains on after this step
        self._last_refresh: dict[int, int] = {}
        self._packed: dict[tuple, Any] = {}
        self._versions: dict[int, int] = {}
        self._warned: set[str] = set()
        self._on_the_fly_left: dict[int, int] = {}  # calibration micro-batches left to layers nobody calibrated
        self._oracle = oracle

    def attach(self, controller: LemoController) -> None:
        """Train on the queued inputs each time ``controller`` sees the optimizer step move (its step hook)."""
        if self.controller is not None:
            raise LemoConfigError("a predictor scorer serves one model: build one per apply_lemo")
        self.controller = controller
        controller.add_step_hook(self.train_queued)

    # ---- binding to a model -----------------------------------------------------------------------------

    @property
    def bound(self) -> bool:
        return self.trainer is not None

    def bind(self, model_config: Any) -> None:
        """Check the predictors against the model (fingerprint, sparse layers) and make the missing ones.

        Called with the Hugging Face config by launch/train.py before anything starts, else on the first score.
        """
        fingerprint = model_fingerprint(model_config, self.config.block_size)
        ratios = self.config.layer_keep_ratios(fingerprint["num_hidden_layers"])
        sparse = [i for i, ratio in enumerate(ratios) if ratio < 1.0]
        if self.meta is not None:
            check_fingerprint(self.meta["fingerprint"], fingerprint, self.config.predictor_path)
            missing = [i for i in sparse if i not in self.bank]
            if missing:
                raise LemoConfigError(
                    f"predictors file {self.config.predictor_path} has predictors for layers {self.bank.layers}, "
                    f"but the lemo config makes layers {sparse} sparse (missing: {missing}); train predictors for "
                    "these layers or change keep_ratio/dense_layers"
                )
        if self.bank is None:
            self.bank = PredictorBank(fingerprint["hidden_size"], self.design, sparse, seed=self.config.seed)
        rule = SelectionRule(
            self.config.block_size,
            {i: ratios[i] for i in sparse},
            self.config.min_blocks,
            tuple(self.config.always_keep_blocks),
            self.config.selection_window,
        )
        self.trainer = PredictorTrainer(self.bank, rule, self.settings.lr, self.settings.rank_weight)
        self.fingerprint = fingerprint

    def to(self, device: torch.device) -> None:
        """Move the predictors (fp32) and their optimizers' state to ``device``."""
        if self._device() != device:
            self.trainer.to(device)  # Adam's moments too: state restored on the host survives the move to the GPU
            self._packed.clear()

    def _device(self) -> torch.device:
        """Where the predictors are (the host for a bank without any)."""
        for param in self.bank.parameters():
            return param.device
        return torch.device("cpu")

    @property
    def all_trained(self) -> bool:
        """Every sparse layer's predictor has been trained (a file, a calibration, a checkpoint restored)."""
        return self.bound and all(index in self.trained for index in self.trainer.sparse_layers)

    # ---- scoring ------------------------------------------------------------------------------------------

    def score(self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext) -> torch.Tensor:
        if not self.bound:
            self.bind(context.policy.attention(layer).config)
        self.to(hidden_states.device)
        index = context.layer_index
        learns = layer.training and not _in_backward()  # a checkpoint's recompute is not a new micro-batch
        if learns and index not in self.queue and self._refresh_due(index, context.step):
            self._last_refresh[index] = context.step
            return self._queue(layer, hidden_states, context, self.settings.refresh_updates, context.step)
        if index not in self.trained and index not in self._on_the_fly_left:
            self._on_the_fly_left[index] = self.settings.calibration_batches
        if learns and self._on_the_fly_left.get(index, 0) > 0:
            # Nobody calibrated this layer (no file, no lemo_ds.predictors.calibrate): calibrate on the fly on its
            # first scored training micro-batches (one per optimizer step), which the oracle selects meanwhile.
            self._warn_once(
                f"lemo predictor scorer: layer {index} has no trained predictor; calibrating on the fly on its first "
                f"{self.settings.calibration_batches} training micro-batches (one per optimizer step, selected by the "
                "oracle meanwhile)"
            )
            if index in self.queue:  # one input waits per layer: the step's later micro-batches only select
                return self._oracle.score(layer, hidden_states, context)
            self._on_the_fly_left[index] -= 1
            return self._queue(layer, hidden_states, context, self.settings.calibration_updates, None)
        if index not in self.trained:
            self._warn_once(f"lemo predictor scorer: layer {index} has no trained predictor yet; scoring with oracle")
            return self._oracle.score(layer, hidden_states, context)
        return self.predict(index, hidden_states, context.block_size, context.attention_mask, context.first_key_block())

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned.add(message)

    def predict(
        self,
        index: int,
        hidden_states: torch.Tensor,  # [b, s, h]
        block_size: int,
        attention_mask: torch.Tensor | None = None,  # [b or 1, 1, s, s] or None
        lo: torch.Tensor | None = None,  # [b, n] first key block per query block (documents), if no mask
    ) -> torch.Tensor:
        """Predicted block scores [b, n] of layer ``index`` (the fused kernel where it runs)."""
        seq = hidden_states.shape[1]
        n = num_blocks(seq, block_size)
        if attention_mask is not None:
            lo = lo_block_from_mask(attention_mask, block_size, seq)
        if self.prefers_prior(index):
            return positional_prior(lo, n, hidden_states.shape[0], hidden_states.device)
        predictor = self.bank.get(index)
        key = (index, hidden_states.dtype, hidden_states.device, n)
        version = self._versions.get(index, 0)
        cached = self._packed.get(key)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = (version, predictor.packed(hidden_states.dtype), predictor.dist_table(n, hidden_states.device))
            self._packed[key] = cached
        _, packed, dist = cached
        return predictor_scores(hidden_states, packed, dist, block_size, lo, backend=self.config.kernels)

    def prefers_prior(self, index: int) -> bool:
        """Score layer ``index`` with the positional prior: its predictor recalled less than the prior over its
        latest observations, or (none yet) the predictors file says so."""
        if self.trainer.history.get(index):
            return self.trainer.prefers_prior(index)
        return index in self.prior_layers

    def save(self, path: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the predictors (with the model's fingerprint and the layers scored by the prior) to ``path``."""
        prior = [i for i in self.bank.layers if self.prefers_prior(i)]
        return save_predictors(path, self.bank, self.fingerprint, info, prior)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def train_pending(self) -> None:
        """Train the inputs queued in the step just taken now, if the optimizer step moved since the last forward
        (``poll_step`` runs the step hook). A collective where ranks all-reduce: every rank calls it, e.g. before a
        checkpoint."""
        if self.controller is not None:
            self.controller.poll_step()

    def save_checkpoint(self, folder: str | os.PathLike, info: dict[str, Any] | None = None) -> list[Path]:
        """Write the scorer's whole state into ``folder``: the predictors as a predictors file (``CHECKPOINT_BANK``,
        ``info`` in its metadata) and what training needs to continue exactly (``CHECKPOINT_STATE``), each
        atomically. One rank writes: every rank holds the same state. Returns the two paths.

        RuntimeError while layer inputs wait in the queue (a save between a forward and its optimizer step; call
        ``train_pending`` on every rank after the step): writing without them would lose them."""
        if self.queue:
            raise RuntimeError(
                f"the predictor scorer still holds queued inputs of layers {sorted(self.queue)} (they train after the "
                "optimizer step); save the checkpoint after the step, once train_pending ran on every rank"
            )
        folder = Path(folder)
        bank, state = folder / CHECKPOINT_BANK, folder / CHECKPOINT_STATE
        self.save(bank, info)  # save_predictors writes atomically
        write_atomically(state, lambda path: torch.save(self.training_state(), path))
        return [bank, state]

    def training_state(self) -> dict[str, Any]:
        """The state beyond the predictors' weights (plain types: ``torch.load(weights_only=True)`` reads it)."""
        return {
            "format": _STATE_FORMAT,
            "trainer": self.trainer.state_dict(),
            "trained": sorted(self.trained),
            "prior_layers": sorted(self.prior_layers),
            "last_refresh": dict(self._last_refresh),
            "on_the_fly_left": dict(self._on_the_fly_left),
        }

    def load_checkpoint(self, folder: str | os.PathLike, device: torch.device | None = None) -> None:
        """Restore what ``save_checkpoint`` wrote into ``folder``: the predictors (with their pruned sizes) on
        ``device`` (default: where the current ones are), their optimizers, observations and schedule. The scorer
        is bound to its model (``bind``); LemoConfigError when the file was written for another model or lacks a
        sparse layer of this config."""
        if not self.bound:
            raise LemoConfigError("bind the predictor scorer to its model before loading a checkpoint into it")
        path = Path(folder) / CHECKPOINT_BANK
        bank, meta = load_predictors(path)
        check_fingerprint(meta["fingerprint"], self.fingerprint, str(path))
        missing = [index for index in self.trainer.sparse_layers if index not in bank]
        if missing:
            raise LemoConfigError(
                f"{path} has predictors for layers {bank.layers}, but the lemo config makes layers "
                f"{self.trainer.sparse_layers} sparse (missing: {missing}); resume with the lemo config that wrote it"
            )
        state = torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        # On its device before the optimizers are rebuilt over it: their state lands there too.
        self.bank = self.trainer.bank = bank.to(self._device() if device is None else device)
        self.design = bank.design
        self.trainer.load_state_dict(state["trainer"])
        self.trained = set(state["trained"])
        self.prior_layers = set(state["prior_layers"])
        self._last_refresh = {int(index): step for index, step in state["last_refresh"].items()}
        self._on_the_fly_left = {int(index): left for index, left in state["on_the_fly_left"].items()}
        self._packed.clear()
        for index in bank.layers:  # packed weights of the old predictors are stale
            self._versions[index] = self._versions.get(index, 0) + 1

    # ---- training -----------------------------------------------------------------------------------------

    def observe(
        self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext, updates: int
    ) -> tuple[torch.Tensor, Observation]:
        """Oracle labels for this layer input, recall of the current predictor on them, then ``updates`` steps, now
        (calibration: the model frozen, outside any training forward). Returns (oracle scores [b, n], the
        trainer's Observation)."""
        if not self.bound:
            self.bind(context.policy.attention(layer).config)
        self.to(hidden_states.device)
        labels = oracle_labels(layer, hidden_states, context, backend=self.config.kernels)
        return labels.scores, self._learn(context.layer_index, hidden_states, labels, updates)

    def _learn(self, index: int, hidden_states: torch.Tensor, labels: OracleLabels, updates: int) -> Observation:
        observation = self.trainer.observe(index, hidden_states, labels, updates)
        self.trained.add(index)
        self._versions[index] = self._versions.get(index, 0) + 1
        return observation

    def _refresh_due(self, index: int, step: int) -> bool:
        every = self.settings.refresh_every
        if every <= 0 or step <= 0 or step % every:
            return False
        return self._last_refresh.get(index) != step

    def _queue(
        self, layer: nn.Module, hidden_states: torch.Tensor, context: ScoreContext, updates: int, refresh: int | None
    ) -> torch.Tensor:
        """Queue this layer input for the step hook (the caller found the layer's slot empty); returns the oracle's
        scores [b, n]."""
        labels = oracle_labels(layer, hidden_states, context, backend=self.config.kernels)  # under no_grad
        held, ready = QueuedInput.hold(hidden_states)
        self.queue[context.layer_index] = QueuedInput(held, ready, labels, updates, refresh)
        return labels.scores

    def train_queued(self, step: int) -> None:
        """The step hook (``step``: the optimizer step now): train every layer's predictor on its queued input, in
        layer order (the order of the trainer's all-reduces on every rank), and log the refreshes."""
        queue, self.queue = self.queue, {}
        for index in sorted(queue):
            queued = queue[index]
            device = queued.labels.scores.device
            with torch.inference_mode(False):  # the hook may run in a forward under inference_mode
                observation = self._learn(index, queued.hidden_on(device), queued.labels, queued.updates)
            if queued.refresh_step is not None:
                self.refresh_log.append({"step": queued.refresh_step, "layer": index, "recall": observation.recall,
                                         "prior_recall": observation.prior_recall})  # fmt: skip

    def pop_refresh_log(self) -> list[dict[str, float]]:
        """The refreshes trained since the last call: [{"step" (of the refreshed batch), "layer", "recall",
        "prior_recall"}]. The step just taken is seen first (``poll_step``), so that its refresh is in."""
        if self.controller is not None:
            self.controller.poll_step()
        log, self.refresh_log = self.refresh_log, []
        return log


def checkpoint_saved(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (a checkpoint's tag) holds a predictor scorer's state (``save_checkpoint``)."""
    return (Path(folder) / CHECKPOINT_BANK).is_file()


def find_predictor_scorer(model: nn.Module) -> PredictorScorer | None:
    """The predictor scorer of a model converted by apply_lemo (through peft or DeepSpeed wrappers), or None."""
    for module in model.modules():
        sparse = getattr(getattr(module, "_lemo", None), "sparse", None)  # a sparse decoder layer's SparsePlan
        if sparse is not None and isinstance(sparse.scorer, PredictorScorer):
            return sparse.scorer
    return None


def bound_predictor_scorer(model: nn.Module) -> PredictorScorer | None:
    """``find_predictor_scorer``, bound to the model's config if nothing bound it yet (launch/train.py binds it
    before anything starts; a model converted by hand binds on its first score)."""
    scorer = find_predictor_scorer(model)
    if scorer is not None and not scorer.bound:
        scorer.bind(unwrap_model(model).config)
    return scorer
