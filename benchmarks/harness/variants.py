"""The compared variants, declared as data, and switching one model object between them.

A variant is (name, gradient checkpointing on/off, loss, lemo section or None). A suite lists variants by
name; a new one is one line in ``VARIANTS`` (or ``Variant(...)`` in the suite itself)::

    Variant("lemo-norm+ckpt", checkpointing=True, loss="hf", lemo={"keep_ratio": 0.4, "scorer": "norm"})

Switching happens on the same model object, between steps: ``lemo_ds.apply_lemo`` / ``remove_lemo`` (class
swap of the sparse layers, in place) and HF's activation checkpointing on/off (non-reentrant, lemo_ds.hf_compat), with
the embedding output requiring grad only while checkpointing is on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from benchmarks.harness.model import BenchModel
from lemo_ds.config import LEMO_ARTIFACT_SELECTION
from lemo_ds.hf_compat import checkpointing_disable, checkpointing_enable

# The harness's variants run LeMo's rule, its keep ratio included (a variant at another ratio is named "@<ratio>").
DEFAULT_KEEP_RATIO = LEMO_ARTIFACT_SELECTION["keep_ratio"]
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class Variant:
    name: str
    checkpointing: bool = False
    loss: Literal["hf", "chunked"] = "hf"
    lemo: dict[str, Any] | None = field(default=None, hash=False)  # the "lemo" section for apply_lemo, or None
    liger: bool = False  # Liger-Kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy on the model

    @property
    def is_lemo(self) -> bool:
        return self.lemo is not None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "checkpointing": self.checkpointing, "loss": self.loss, "lemo": self.lemo,
                "liger": self.liger}


def dense_variant(checkpointing: bool = False, chunked_loss: bool = False) -> Variant:
    return Variant(_name("dense", checkpointing, chunked_loss), checkpointing, "chunked" if chunked_loss else "hf")


# lemo_ds's memory stack (segment loss, sparsity-aware checkpointing, tiled MLP) is on by default in lemo_ds; the
# plain lemo variants switch it off so that they differ from their dense variant by token elimination alone.
MEMORY_OFF = {"segment_loss": False, "sparse_checkpointing": False, "tiled_mlp": False, "compact_saves": False}
# The stack variants: every memory feature. MLP tiles of 2048 tokens: at 8K a dense Llama-2-7B layer's MLP
# activations (gate, up, product: 3 x 8K x 11008 bf16 = 0.5 GiB) shrink to a quarter. Tiled MLP recomputes each
# tile's MLP in backward: with it a "no checkpointing" variant is not free of recomputation.
MEMORY_STACK = {"segment_loss": True, "sparse_checkpointing": True, "tiled_mlp": True, "tiled_mlp_tokens": 2048,
                "compact_saves": True}
# "+exact": no matmul is recomputed (the paper setting's honest comparison with a dense run without checkpointing):
# segment loss (its backward recomputes each segment's LM head: a matmul, but the dense "hf" loss has no checkpoint
# either way: see README) and saved-tensor compaction (casts, SiLU, norms recomputed: elementwise only); no tiled MLP.
MEMORY_EXACT = {"segment_loss": True, "sparse_checkpointing": True, "tiled_mlp": False, "compact_saves": True}
# "+offload": the stack plus host offload of the checkpointed layers' stored inputs (long context).
MEMORY_OFFLOAD = {**MEMORY_STACK, "offload_checkpoints": True}
STACKS = {"stack": MEMORY_STACK, "exact": MEMORY_EXACT, "offload": MEMORY_OFFLOAD}


def lemo_variant(scorer: str, checkpointing: bool = False, chunked_loss: bool = False,
                 keep_ratio: float = DEFAULT_KEEP_RATIO, stack: bool | str = False, **lemo_keys: Any) -> Variant:
    """``lemo-<scorer>[+ckpt][+chunked-loss]``: the dense variant with the same memory features, plus LeMo in the
    deeper half (lemo_ds's "auto" dense layers: the first half and the last layer stay dense).
    ``lemo-<scorer>[+ckpt]+stack``: LeMo with lemo_ds's whole memory stack (its own segment loss)."""
    stack = "stack" if stack is True else stack
    # LeMo's own rule (independent choices, the loss on every token, LeMo's dense layers), which the harness's
    # figures have measured from the start; the main job's rule is ds_configs/zero3_lemo.json's (product_path.py).
    section = {**LEMO_ARTIFACT_SELECTION, "keep_ratio": keep_ratio, "scorer": scorer, "block_size": DEFAULT_BLOCK_SIZE,
               "memory": dict(STACKS[stack] if stack else MEMORY_OFF), **lemo_keys}
    name = _name(f"lemo-{scorer}", checkpointing, chunked_loss) + (f"+{stack}" if stack else "")
    if keep_ratio != DEFAULT_KEEP_RATIO:
        name += f"@{keep_ratio:g}"
    return Variant(name, checkpointing, "chunked" if chunked_loss else "hf", section)


# The predictor variants: no predictors file; lemo_ds calibrates each sparse layer's predictor on the fly on the
# variant's first scored step (its warm-up: oracle selection and 20 predictor updates), and every later step scores
# with the predictors. Measurement rounds re-apply lemo_ds at each switch, so ``deactivate`` keeps the calibrated
# predictors in a file that the next ``activate`` loads (bench.info["predictor_files"]).
PREDICTOR_ON_THE_FLY = {"calibration_batches": 1, "calibration_updates": 20}


def predictor_variant(checkpointing: bool = False, chunked_loss: bool = False, stack: bool = False) -> Variant:
    return lemo_variant("predictor", checkpointing, chunked_loss, stack=stack, predictor=dict(PREDICTOR_ON_THE_FLY))


def dense_stack_variant(checkpointing: bool = False, stack: str = "stack") -> Variant:
    """``dense[+ckpt]+<stack>``: the dense model (keep 1.0 everywhere) with lemo_ds's memory stack: like with like."""
    section = {"keep_ratio": 1.0, "memory": dict(STACKS[stack])}
    return Variant(_name("dense", checkpointing, False) + f"+{stack}", checkpointing, "hf", section)


# What users run instead of lemo_ds: Hugging Face + Liger-Kernel (what TrainingArguments(use_liger_kernel=True)
# applies) + non-reentrant activation checkpointing, on packed rows through the document attention (activate).
HF_LIGER = Variant("hf-liger", checkpointing=True, loss="hf", liger=True)


def _name(stem: str, checkpointing: bool, chunked_loss: bool) -> str:
    return stem + ("+ckpt" if checkpointing else "") + ("+chunked-loss" if chunked_loss else "")


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        dense_variant(),
        dense_variant(checkpointing=True),
        dense_variant(checkpointing=True, chunked_loss=True),
        *(lemo_variant(scorer) for scorer in ("norm", "random", "oracle")),
        *(lemo_variant(scorer, checkpointing=True) for scorer in ("norm", "random", "oracle")),
        *(lemo_variant(scorer, checkpointing=True, chunked_loss=True) for scorer in ("norm", "random", "oracle")),
        dense_stack_variant(),
        dense_stack_variant(checkpointing=True),
        *(lemo_variant(scorer, stack=True) for scorer in ("norm", "oracle")),
        *(lemo_variant(scorer, checkpointing=True, stack=True) for scorer in ("norm", "oracle")),
        predictor_variant(),
        predictor_variant(checkpointing=True),
        predictor_variant(checkpointing=True, chunked_loss=True),
        predictor_variant(checkpointing=True, stack=True),
        dense_stack_variant(stack="exact"),
        lemo_variant("oracle", stack="exact"),
        dense_stack_variant(checkpointing=True, stack="offload"),
        lemo_variant("oracle", checkpointing=True, stack="offload"),
        HF_LIGER,
    )
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def activate(bench: BenchModel, variant: Variant, documents: int = 1) -> None:
    """Switch the model to ``variant`` for rows of ``documents`` packed documents (a no-op when it is already
    active for such rows)."""
    current: Variant | None = bench.active_variant
    packed = documents > 1
    if current is not None and current.name == variant.name and bench.info.get("packed", False) == packed:
        return
    deactivate(bench)
    if packed:
        import lemo_ds

        # Dense and lemo variants alike attend within documents without [s, s] masks: like with like. On before
        # apply_lemo, which then leaves it on at remove_lemo; deactivate turns it off.
        lemo_ds.enable_document_attention(bench.model)
        bench.info["packed"] = True
    if variant.checkpointing:
        # HF's enable also makes the embedding output require grad (enable_input_require_grads), which peft +
        # checkpointing needs so that gradients reach the LoRA weights through checkpointed layers.
        checkpointing_enable(bench.causal_lm, use_reentrant=False)
        if not getattr(bench.causal_lm, "_require_grads_hooks", None):
            bench.causal_lm.enable_input_require_grads()
    if variant.liger:
        bench.info["liger_undo"] = apply_liger(bench.causal_lm)
    if variant.lemo is not None:
        import lemo_ds  # only lemo variants need it (and it imports DeepSpeed)

        section = dict(variant.lemo)
        saved = bench.info.get("predictor_files", {}).get(variant.name)
        if section.get("scorer") == "predictor" and saved is not None:
            section["predictor_path"] = saved  # calibrated at an earlier activation of this variant
        lemo_ds.apply_lemo(bench.model, section)
    bench.active_variant = variant


def deactivate(bench: BenchModel) -> None:
    """Back to the plain dense model without checkpointing (drops lemo_ds's per-layer state too)."""
    current: Variant | None = bench.active_variant
    if current is None:
        return
    if current.lemo is not None:
        import lemo_ds

        if current.lemo.get("scorer") == "predictor":
            _keep_predictors(bench, current)
        lemo_ds.remove_lemo(bench.model)
    undo_liger = bench.info.pop("liger_undo", None)
    if undo_liger is not None:
        undo_liger()
    if bench.info.pop("packed", False):
        import lemo_ds

        lemo_ds.disable_document_attention(bench.model)
    if current.checkpointing:
        checkpointing_disable(bench.causal_lm)
        # HF's disable leaves the input-grad hook in place (it removes it only for its own peft integration), and
        # each enable adds one more: remove it, so variants without checkpointing run exactly as plain LoRA.
        bench.causal_lm.disable_input_require_grads()
    bench.active_variant = None


def apply_liger(causal_lm: Any) -> Any:
    """Liger-Kernel's ``apply_liger_kernel_to_llama`` on the model (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)
    and a function that undoes it. Liger patches the modeling module's globals and the modules' instance dicts (their
    ``forward`` and a few settings); the undo restores both from a snapshot, so the next variant runs the plain
    model again."""
    import sys

    from liger_kernel.transformers import apply_liger_kernel_to_llama

    modeling = sys.modules[type(causal_lm).__module__]
    saved_globals = dict(vars(modeling))
    saved_dicts = [(module, dict(module.__dict__)) for module in causal_lm.modules()]
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=causal_lm)  # fmt: skip

    def undo() -> None:
        for name, value in saved_globals.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
        for module, before in saved_dicts:
            for key in [key for key in module.__dict__ if key not in before]:
                del module.__dict__[key]
            module.__dict__.update(before)

    return undo


def _keep_predictors(bench: BenchModel, variant: Variant) -> None:
    """Save the variant's calibrated predictors for its next activation (once: later activations load them)."""
    import atexit
    import tempfile

    from lemo_ds.predictors.scorer import find_predictor_scorer

    files = bench.info.setdefault("predictor_files", {})
    scorer = find_predictor_scorer(bench.model)
    if variant.name in files or scorer is None or not scorer.bound or scorer.trained != set(scorer.bank.layers):
        return
    handle, path = tempfile.mkstemp(prefix="lemo_predictors_", suffix=".safetensors")
    os.close(handle)
    atexit.register(Path(path).unlink, missing_ok=True)  # needed while the benchmark process runs, not after
    scorer.save(path, {"calibrated": "on the fly, benchmark warm-up"})
    files[variant.name] = path


# ---- --lemo-set overrides (benchmarks/run.py, benchmarks/memory_peak.py) ----------------------------------

def parse_lemo_overrides(pairs: list[str], flag: str = "--lemo-set") -> dict[str, Any]:
    """``KEY=VALUE`` pairs -> a partial "lemo" section (values as JSON, else bare strings such as kernels=torch); a
    dotted key sets a key of a sub-section, e.g. ``memory.compact_saves=false``."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        section, dot, leaf = key.strip().rpartition(".")
        (overrides.setdefault(section, {}) if dot else overrides)[leaf if dot else key.strip()] = parsed
    return overrides


def with_lemo_overrides(variant: Variant, overrides: dict[str, Any], tag: str = "") -> Variant:
    """The variant with ``overrides`` merged into its "lemo" section (sub-sections key by key); dense variants as
    they are. ``tag``: appended to the name, so that results tell the changed variant apart."""
    if not overrides or variant.lemo is None:
        return variant
    section = dict(variant.lemo)
    for key, value in overrides.items():
        section[key] = {**section.get(key, {}), **value} if isinstance(value, dict) else value
    return replace(variant, lemo=section, name=variant.name + tag)
