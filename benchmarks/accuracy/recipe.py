"""The experiment's settings, as data: the full recipe (one H200, under 10 minutes) and a tiny one (CPU tests)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

# lemo_ds's selection for fine-tuning quality (beyond LeMo's rule): a block eliminated once stays eliminated
# (nested), the loss counts the positions that ran through every sparse layer, each window of 8 blocks keeps its
# share, and the last layer is sparse too (with the processed loss, a dense last layer would read the skipped rows'
# shallow states as keys). Measured in benchmarks/results/accuracy-experiments: LeMo's rule lost 7-14% perplexity
# at keep 0.4; the first three choices brought it to 2-6% (depending on the reference model); the sparse last layer
# took two references from 2.9-3.0% to 2.3-2.7% and from 5.6% to 3.3-3.6%.
NESTED = {"loss_tokens": "processed", "nested_selection": True, "selection_window": 8, "dense_layers": "first_half"}


# The fields the reference model depends on (a cached model is reused only when they match; runs share it).
REFERENCE_FIELDS = ("heldout_every", "book_limit", "vocab_size", "hidden_size", "layers", "heads", "kv_heads",
                    "intermediate_size", "rope_theta", "short_seq", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                    "pretrain_warmup", "pretrain_passkey_rate", "pretrain_induction_rate", "pretrain_induction_source",
                    "deterministic_pretraining", "seed")  # fmt: skip
# The fields one run may change for itself (a mode's ``recipe.FIELD`` keys): the fine-tuning, not the shared model,
# data split or evaluation.
RUN_FIELDS = ("finetune_books", "finetune_steps", "finetune_lr", "finetune_warmup", "lr_schedule", "lora_r",
              "block_size")  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    name: str
    # -- corpus ----------------------------------------------------------------------------------------------
    heldout_every: int = 8  # every 8th book (name order) is held out: 9 of the 74
    book_limit: int | None = None  # None: every book
    # Train books the fine-tuning runs read (each run reads the same ones, same order); None: every train book.
    finetune_books: int | None = None
    # -- reference model (Llama architecture, GQA) -------------------------------------------------------------
    vocab_size: int = 8192
    hidden_size: int = 512
    layers: int = 12  # lemo_ds's "auto" dense layers: 0-5 and 11 dense, 6-10 sparse
    heads: int = 8
    kv_heads: int = 4
    intermediate_size: int = 1536
    rope_theta: float = 10000.0
    # -- pretraining at the short context ----------------------------------------------------------------------
    short_seq: int = 1024
    pretrain_steps: int = 1200
    pretrain_batch: int = 32  # rows of short_seq tokens per step
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 60
    # Share of the pretraining rows that are passkey documents of short_seq tokens (passkey.pretraining_row), meant to
    # give a reference that retrieves at the short context. It did not: at 10% (12 layers) and 50% (24 layers) the
    # reference answered no held-out passkey at 1K, its answer log-likelihood (-2.49 and -2.50 per token; the code
    # is mostly one digit per token) near guessing each digit (-ln 10 = -2.30; benchmarks/results/
    # accuracy-20261202-round2), so 0 (books only) stays the default.
    pretrain_passkey_rate: float = 0.0
    # Share of the pretraining rows that are one repeated segment (pretrain.induction_row): a copying task meant
    # to form the induction circuit retrieval needs, which books alone do not teach at this budget. 0 by default so
    # the headline reference stays the books-only one; reference D (experiments/retrieval.sh) uses 0.5.
    pretrain_induction_rate: float = 0.0
    # What an induction row repeats: "books", a window of the pretraining books; "random", uniform ids over the
    # vocabulary. At 90% of the rows for 1200 steps the 12-layer reference learned to copy book windows (loss on the
    # later copies 1.00 against 5.08 on the first) and barely random ids (8.10 against 11.81), and random ids at 90%
    # taught it nothing (9.01 = ln(vocab)) (benchmarks/results/accuracy-20261203-retrieval): with uniform ids each
    # one recurs only a few times a step, while the text's frequent tokens recur in every row.
    pretrain_induction_source: Literal["books", "random"] = "books"
    # torch.use_deterministic_algorithms during pretraining (strict: flash attention's backward then runs its
    # deterministic path); see pretrain.pretrain.
    deterministic_pretraining: bool = True
    # -- context extension: RoPE scaling by ``extension`` and LoRA fine-tuning through launch/train.py ------------
    extension: int = 8
    # "linear": position interpolation (every frequency divided by ``extension``; LongLoRA's and LeMo's setting);
    # "yarn": YaRN (high frequencies kept, low ones interpolated, attention temperature), Hugging Face's "yarn"
    # rope type with original_max_position_embeddings = short_seq.
    rope_scaling: Literal["linear", "yarn"] = "linear"
    # 1000 steps: at 300 every lemo run was 1-2 points further from dense (benchmarks/results/accuracy-full-*).
    finetune_steps: int = 1000
    finetune_lr: float = 1e-3
    finetune_warmup: int = 20  # steps of linear warm-up to finetune_lr
    # "linear": warm-up, then a linear decay to 0 at the last step (DeepSpeed's WarmupDecayLR); "constant": warm-up,
    # then finetune_lr to the end (WarmupLR).
    lr_schedule: Literal["linear", "constant"] = "linear"
    lora_r: int = 8
    block_size: int = 64
    keep_ratio: float = 0.4  # the headline comparison
    # The fine-tuning runs besides dense: (scorer, keep ratio, mode); a mode is a set of extra "lemo" keys.
    runs: tuple[tuple[str, float, str], ...] = (
        *((scorer, 0.4, "") for scorer in ("predictor", "random")),
        *((scorer, 0.4, "nested") for scorer in ("predictor", "oracle", "norm", "random")),
        *(("predictor", keep, "nested") for keep in (0.2, 0.6, 0.8)),
    )
    modes: dict[str, dict] = field(default_factory=lambda: {"": {}, "nested": dict(NESTED)})
    # Predictors trained offline (launch/train_predictor.py) on the extended model before the predictor runs; 0: no
    # offline training, each predictor run calibrates its own at its start (lemo.predictor.calibration_batches, as a
    # user's job without a predictors file does).
    predictor_batches: int = 96
    predictor_eval_batches: int = 16
    eval_rows: int = 40  # held-out rows of short_seq * extension tokens
    # -- passkey retrieval (benchmarks/accuracy/passkey.py) --------------------------------------------------------
    # Share of the fine-tuning rows that are passkey documents (one row each; the books trimmed to whole rows so
    # every run packs them alone in their rows); 0: the books as they are, no passkey documents. Every run alike.
    passkey_rate: float = 0.05
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # needle depths of the held-out passkey rows
    passkey_rows: int = 20  # held-out passkey rows of long_seq tokens per depth (dense evaluation); 0: none
    parallel: int = 12  # fine-tuning runs at once on the one GPU (small model: one run leaves it mostly idle)
    threads_per_run: int = 2
    seed: int = 0

    def __post_init__(self):
        # A misspelt choice (``--set rope_scaling=yarm``) stops here, not minutes later inside a fine-tuning run.
        for name, choices in _choice_fields().items():
            if getattr(self, name) not in choices:
                raise ValueError(f"recipe.{name} = {getattr(self, name)!r}: expected one of {', '.join(choices)}")
        for name in ("pretrain_passkey_rate", "pretrain_induction_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"recipe.{name} = {getattr(self, name)!r}: expected a share in [0, 1)")
        if self.pretrain_passkey_rate + self.pretrain_induction_rate >= 1.0:
            raise ValueError(f"recipe.pretrain_passkey_rate + pretrain_induction_rate = "
                             f"{self.pretrain_passkey_rate + self.pretrain_induction_rate:g}: leave some rows for the "
                             f"books (a sum under 1)")  # fmt: skip

    @property
    def long_seq(self) -> int:
        return self.short_seq * self.extension

    def reference_key(self) -> str:
        """Hash of REFERENCE_FIELDS: a cached model is reused only when it matches."""
        blob = json.dumps({name: getattr(self, name) for name in REFERENCE_FIELDS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def _choice_fields() -> dict[str, tuple]:
    """{field: its allowed values} for every ``Literal`` field of Recipe (read from the annotations)."""
    hints = typing.get_type_hints(Recipe)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


FULL = Recipe("full")
# Seconds on two CPU cores: a 4-layer model of width 64, 256-token pretraining rows, 2x extension, a few steps.
TINY = Recipe(
    "tiny",
    heldout_every=4,
    book_limit=8,
    finetune_books=2,
    vocab_size=512,
    hidden_size=64,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate_size=128,
    short_seq=128,
    pretrain_steps=30,
    pretrain_batch=4,
    pretrain_lr=3e-3,
    pretrain_warmup=5,
    pretrain_passkey_rate=0.25,
    pretrain_induction_rate=0.25,
    extension=2,
    finetune_steps=3,
    finetune_warmup=1,
    block_size=16,
    runs=(("predictor", 0.4, ""), ("random", 0.4, ""), ("predictor", 0.4, "nested")),
    predictor_batches=2,
    predictor_eval_batches=1,
    eval_rows=2,
    passkey_rows=2,
    parallel=2,
    threads_per_run=1,
)
RECIPES = {recipe.name: recipe for recipe in (FULL, TINY)}
