"""Training predictors on oracle labels: a few Adam steps per observed layer input, streaming.

Every user of the predictors trains them the same way: offline (launch/train_predictor.py), at the start of a
training run (calibration), and during it (online refresh). Each observes one layer input and its oracle labels at
a time, measures the predictor's recall on it first (the batch is new to the predictor: a held-out figure), then
takes ``updates`` optimizer steps on it. Nothing is stored between batches, so memory stays at one layer input.

Data parallelism: every rank observes its own batch; the gradients (and the recall) are averaged over the ranks
with one all-reduce per update, and the predictors start from the same seeded init, so every rank holds the same
predictors. Every rank must therefore observe the same layers in the same order (the sparse layers run in a fixed
order on every rank, as ZeRO-3 requires anyway).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lemo_ds import distributed, step_guard
from lemo_ds.core.selection import num_blocks
from lemo_ds.predictors.labels import OracleLabels
from lemo_ds.predictors.loss import predictor_loss
from lemo_ds.predictors.module import PredictorBank, block_pair_allowed
from lemo_ds.predictors.recall import free_choice, topk_recall

GRAD_CLIP = 1.0


@dataclass(frozen=True)
class SelectionRule:
    """What the contract needs to know which blocks a layer keeps."""

    block_size: int
    keep_ratios: dict[int, float]  # target keep ratio per sparse layer
    min_blocks: int = 1
    always_keep: tuple[int, ...] = (0,)
    window: int = 0  # stratified selection (lemo selection_window), 0: global top-k


@dataclass
class Observation:
    layer: int
    recall: float  # of the predictor before this batch's updates, averaged over samples (and ranks)
    loss: float  # after the last update
    prior_recall: float  # of the positional prior (see positional_prior) on the same batch


def positional_prior(lo_block: torch.Tensor | None, n: int, batch: int, device: torch.device) -> torch.Tensor:
    """[b, n]: the number of query blocks that reach each key block, the part of every oracle score that is pure
    position (an early block has a longer column). A free predictor, and the floor a learned one must beat."""
    return block_pair_allowed(lo_block, n, batch, device).sum(1).float()


def _world() -> int:
    return distributed.world_size()


class PredictorTrainer:
    def __init__(self, bank: PredictorBank, rule: SelectionRule, lr: float = 3e-3, rank_weight: float = 0.0) -> None:
        self.bank = bank
        self.rule = rule
        self.lr = lr
        self.rank_weight = rank_weight
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.history: dict[int, list[Observation]] = defaultdict(list)

    @property
    def sparse_layers(self) -> list[int]:
        return sorted(self.rule.keep_ratios)

    def _optimizer(self, layer: int) -> torch.optim.Optimizer:
        if layer not in self.optimizers:
            optimizer = torch.optim.Adam(self.bank.get(layer).parameters(), lr=self.lr)
            self.optimizers[layer] = step_guard.mark_internal(optimizer)  # not the model's optimizer
        return self.optimizers[layer]

    def reset_optimizer(self, layer: int) -> None:
        """Forget a layer's optimizer state (after its predictor's shapes changed: pruning)."""
        self.optimizers.pop(layer, None)

    def observe(
        self,
        layer: int,
        hidden_states: torch.Tensor,  # [b, s, h], the layer input (no grad)
        labels: OracleLabels,
        updates: int,
    ) -> Observation:
        """Measure the recall of the layer's predictor on this batch, then train it on the batch."""
        predictor = self.bank.get(layer)
        hidden_states = hidden_states.detach()
        seq = hidden_states.shape[1]
        rule = self.rule
        ratio = rule.keep_ratios[layer]
        forced, choose = free_choice(num_blocks(seq, rule.block_size), seq, rule.block_size, ratio,
                                     rule.min_blocks, list(rule.always_keep))  # fmt: skip
        with torch.no_grad():
            _, predicted = predictor(hidden_states, rule.block_size, labels.lo_block)
            prior = positional_prior(labels.lo_block, predicted.shape[1], predicted.shape[0], predicted.device)
            recall = torch.stack(
                [topk_recall(scores, labels.scores, seq, rule.block_size, ratio, rule.min_blocks,
                             rule.always_keep, rule.window).mean() for scores in (predicted, prior)]
            ).to(hidden_states.device)  # [2]: predictor, prior  # fmt: skip
        optimizer = self._optimizer(layer)
        loss_value = float("nan")
        for _ in range(updates):
            # Never inside a layer's forward (the scorer queues, the controller's step hook trains): no activation
            # checkpoint's saved-tensor hooks are active here. Grad on: the hook may run in an evaluation forward.
            with torch.enable_grad():
                tiles, scores = predictor(hidden_states, rule.block_size, labels.lo_block)
                loss, parts = predictor_loss(tiles, scores, labels, choose, forced, self.rank_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self._average_over_ranks(predictor.parameters())
            # Clipping keeps one bad batch from throwing the tiles' softplus into its flat negative side, where
            # every score is ~0 and no gradient is left (seen without it: a planted-pattern run stuck at chance).
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), GRAD_CLIP)
            optimizer.step()
            loss_value = parts["loss"]
        optimizer.zero_grad(set_to_none=True)  # nothing of the predictor's training outlives the call
        if _world() > 1:
            torch.distributed.all_reduce(recall)
            recall = recall / _world()
        observation = Observation(layer, float(recall[0]), loss_value, float(recall[1]))
        self.history[layer].append(observation)
        return observation

    @staticmethod
    def _average_over_ranks(params) -> None:
        world = _world()
        if world == 1:
            return
        params = list(params)
        for p in params:  # the same flat layout on every rank, whatever autograd left unset
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per update
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def state_dict(self) -> dict[str, Any]:
        """What training needs beyond the predictors' weights to continue exactly: each layer's Adam state and its
        observations (``prefers_prior`` reads the latest), in plain types (``torch.load(weights_only=True)``)."""
        return {
            "optimizers": {layer: optimizer.state_dict() for layer, optimizer in sorted(self.optimizers.items())},
            "history": {layer: [asdict(obs) for obs in observations] for layer, observations in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``, over the predictors of ``self.bank`` (already on the device they train
        on: Adam casts its moments to each parameter's device). The learning rate stays this trainer's (the
        config's), so that a changed ``predictor.lr`` applies from the next update."""
        self._load_optimizers(state["optimizers"])
        self.history = defaultdict(list)
        for layer, observations in state["history"].items():
            self.history[int(layer)] = [Observation(**obs) for obs in observations]

    def to(self, device: torch.device) -> None:
        """Move the bank and its optimizers' state to ``device``."""
        saved = {layer: optimizer.state_dict() for layer, optimizer in self.optimizers.items()}
        self.bank.to(device)
        # Rebuilt over the moved parameters: a move may replace them (nn.Module.to does across tensor types).
        self._load_optimizers(saved)

    def _load_optimizers(self, saved: dict[int, dict[str, Any]]) -> None:
        """A fresh Adam per layer of ``saved`` over the bank's parameters, given that state (its moments cast to each
        parameter's device and dtype)."""
        self.optimizers.clear()
        for layer, state in saved.items():
            optimizer = self._optimizer(int(layer))
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:
                group["lr"] = self.lr

    def prefers_prior(self, layer: int, window: int = 4) -> bool:
        """Whether the positional prior recalled more than the predictor over the layer's last ``window``
        observations (each measured before training on its batch). Too little calibration data can leave a
        predictor below the prior (measured on a small Gutenberg Llama: 8 batches of 4K tokens, recall 0.908 vs
        the prior's 0.932; 1000 offline steps reach 0.950); the scorer then scores that layer with the prior."""
        recent = self.history.get(layer, [])[-window:]
        if not recent:
            return False
        return sum(obs.recall for obs in recent) < sum(obs.prior_recall for obs in recent)
