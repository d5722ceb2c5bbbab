"""The "lemo" section of a DeepSpeed JSON config.

Written the way DeepSpeed writes its own config sections: a pydantic model derived from
``DeepSpeedConfigModel`` (``extra="forbid"``, validated assignment), one docstring per field, bounds on
every number and cross-field validators. It is read from one top-level key, ``"lemo"``::

    {
      "train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {"stage": 3},
      "lemo": {"keep_ratio": 0.4, "scorer": "oracle", "schedule": {"dense_steps": 10, "ramp_steps": 100}}
    }

A config without a "lemo" key means "no token elimination"; ``"lemo": {}`` means "token elimination with
every default".
"""

from __future__ import annotations

import json
import os
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from lemo_ds.errors import LemoConfigError

LEMO_KEY = "lemo"

class _LemoSection(DeepSpeedConfigModel):
    # DeepSpeed's settings (extra="forbid", validated assignment), plus each field's docstring as its description
    # so that the README's reference table is generated from this file (``python -m lemo_ds.config``).
    # strict: a value of the wrong JSON type ("0.4" for a number, 1 for a bool) is an error, never converted.
    model_config = ConfigDict(**DeepSpeedConfigModel.model_config, use_attribute_docstrings=True, strict=True)


class LemoScheduleConfig(_LemoSection):
    """Warm-up of the keep ratio, as DeepSpeed's random-LTD schedule does for its sequence length.

    For optimizer step ``t``: keep 1.0 (dense) while ``t < dense_steps``; then a linear ramp from 1.0 down
    to each layer's target over ``ramp_steps`` steps; then the target.
    """

    dense_steps: int = Field(0, ge=0)
    """Steps at the start of training that run every layer dense."""

    ramp_steps: int = Field(0, ge=0)
    """Steps of the linear ramp from 1.0 to the target keep ratio after the dense steps (0: jump)."""


class LemoMemoryConfig(_LemoSection):
    """The memory stack: what besides token elimination keeps long sequences in memory. Every feature also
    works with every keep ratio at 1.0, so a dense model can be compared like with like."""

    segment_loss: bool = True
    """LM head and cross-entropy over segments of the sequence, never the full [seq, vocab] logits (exact loss
    and gradients). A forward given ``labels`` then returns the loss and ``logits=None``."""

    segment_tokens: int = Field(4096, ge=1)
    """Positions per segment of the segment loss (its working memory is about segment x vocab x 4 bytes)."""

    segment_loss_impl: Literal["auto", "liger", "torch"] = "auto"
    """``liger``: Liger-Kernel's fused linear cross-entropy (CUDA; ZeRO-3 included: it runs as the LM head's
    forward, so DeepSpeed gathers the partitioned weight for it); ``torch``: lemo_ds's segmented PyTorch loss
    (works everywhere); ``auto``: Liger on CUDA where liger-kernel is installed (the extra ``lemo_ds[liger]``),
    else torch."""

    sparse_checkpointing: bool = True
    """Under activation checkpointing, a sparse layer stores only the kept rows of its input (and recomputes
    only on them) instead of its whole input: stored activations grow with (dense layers + sum of keep
    ratios) x seq x hidden."""

    tiled_mlp: bool = False
    """Run every decoder layer's MLP in tiles along the sequence (DeepSpeed's TiledMLP: each tile recomputed
    in backward), so the MLP's [seq, intermediate] activations never exist whole. Costs one more MLP
    forward; worth it at long context."""

    tiled_mlp_tokens: int = Field(8192, ge=1)
    """Tokens per MLP tile."""

    compact_saves: bool = False
    """Inside every decoder layer, store the source of a tensor that autograd saves when that tensor is a cheap
    exact function of it, and recompute it in backward: float32 copies of bf16 inputs (each LoRA adapter's, each
    RMSNorm's), SiLU's output (from gate), the norms' outputs (from their inputs). Bit-identical gradients, no
    matmul recomputed. Off by default because the recomputation costs step time; what it saves and costs is
    measured by benchmarks/memory_accounting.py and the memory suites (README, "Scoreboard")."""

    offload_checkpoints: bool = False
    """Under activation checkpointing (Hugging Face's or DeepSpeed's), move each layer's stored input (a sparse
    layer's kept rows) to pinned host memory after its forward, with asynchronous copies, and back during backward
    with the previous layer's input prefetched. Off by default: it needs (dense layers + sum of keep ratios) x seq
    x hidden x 2 bytes of pinned host memory and pays off only where stored inputs set the peak (long context; at
    short context it only adds PCIe traffic; README, "Scoreboard")."""

    pinned_buffers: Literal["power_of_two", "registered"] = "power_of_two"
    """How offload_checkpoints page-locks its host buffers. ``power_of_two``: PyTorch's pinned allocator, which
    rounds each buffer up to a power of two (a dense layer's input of 4.1 GiB takes 8 GiB): where the host runs
    out first, the offload stops at a power-of-two boundary of the length. ``registered``: ordinary host memory
    page-locked with cudaHostRegister, each buffer under 1/8 over the input (at least 2 MiB), for lengths where
    host memory sets the limit. Not the default: its one GPU test run so far failed (a page registered twice),
    and the fix has not run on a GPU yet."""

    resident_checkpoints: int = Field(0, ge=0)
    """With offload_checkpoints: the stored inputs of the first this many checkpointed decoder layers of each forward
    stay on the device instead of going to the host, so that spare device memory (a 141 GB card's) takes what the
    host has no room for. 0: every layer's goes to the host."""

    layers_per_stored_input: int = Field(1, ge=1, le=8)
    """With offload_checkpoints, where host memory runs out: of this many consecutive dense decoder layers only the
    first stores its input (on the host); the others' inputs are rebuilt in backward by running the layer below
    again without grad. Host memory for the dense layers' inputs / this value, for one more layer forward per
    rebuilt input; the device holds this value - 2 more inputs (none at 2). 1: every layer stores its input."""

    @model_validator(mode="after")
    def _offload_settings_need_offload(self) -> LemoMemoryConfig:
        if self.pinned_buffers != "power_of_two" and not self.offload_checkpoints:
            raise ValueError(
                f'pinned_buffers "{self.pinned_buffers}" only applies to offloaded checkpoints; set '
                "offload_checkpoints true, or leave pinned_buffers out"
            )
        if self.layers_per_stored_input > 1 and not self.offload_checkpoints:
            raise ValueError(
                f"layers_per_stored_input {self.layers_per_stored_input} only applies to offloaded checkpoints; set "
                "offload_checkpoints true, or leave it out"
            )
        if self.resident_checkpoints > 0 and not self.offload_checkpoints:
            raise ValueError(
                f"resident_checkpoints {self.resident_checkpoints} only applies to offloaded checkpoints (without "
                "offload every stored input stays on the device); set offload_checkpoints true, or leave it out"
            )
        return self


class LemoPredictorConfig(_LemoSection):
    """Learned predictors of block scores (``scorer: "predictor"``): their size, and how they are trained when
    no file is given (calibration on the first batches) and while the model trains (online refresh)."""

    hidden_rank: int = Field(64, ge=1, le=4096)
    """ReLU units per side (queries, keys) of each layer's predictor before pruning. Parameters per layer are
    about 2 x hidden_rank x hidden_size."""

    out_rank: int = Field(32, ge=1, le=1024)
    """Width of the predicted block query and key embeddings."""

    distance_buckets: int = Field(20, ge=1, le=64)
    """Learned biases by log-spaced block distance (20 reach 723 blocks)."""

    lr: float = Field(3e-3, gt=0.0, le=1.0)
    """Adam learning rate of predictor training (calibration and refresh)."""

    rank_weight: float = Field(0.0, ge=0.0, le=100.0)
    """Weight of the ranking loss against the tile regression loss (0: tile regression only, as LeMo). 0 by
    default: on the accuracy model (12-layer Gutenberg Llama, 8K, keep 0.4, 64 batches, 16 held-out) the mean
    recall was 0.939 with 0, 0.916 with 1, 0.897 with 10 and 0.875 with 100; the ranking term drove the query units
    to 1-4 alive of 64 (benchmarks/results/predictor-rank-weight-20261122/)."""

    calibration_batches: int = Field(8, ge=0, le=100000)
    """Without ``predictor_path``: micro-batches that train the predictors from scratch. launch/train.py runs
    them before training (model frozen, layers dense, oracle labels); elsewhere an uncalibrated layer calibrates
    on the fly: the first micro-batch of each of its first this-many optimizer steps is selected by the oracle and
    queued, and the predictors train on it after that step's optimizer step (the controller's step hook)."""

    calibration_updates: int = Field(20, ge=1, le=10000)
    """Optimizer steps of each layer's predictor per calibration micro-batch."""

    refresh_every: int = Field(0, ge=0)
    """Online refresh: every this many optimizer steps, the first micro-batch of the step is scored by the
    oracle (its selection uses the oracle's scores), the predictors' recall on it is logged, and after the optimizer
    step they take ``refresh_updates`` steps on it, so they follow the weights as fine-tuning changes them. 0: off."""

    refresh_updates: int = Field(4, ge=1, le=10000)
    """Optimizer steps of each layer's predictor per refresh."""


# LeMo's own selection rule, as its artifact runs it: 40% of the blocks kept, independent choices per sparse layer,
# one top-k over the whole row, the first half and the last layer dense, the loss on every token; and its scorer, the
# oracle. The defaults are the rule the accuracy benchmark recommends instead (README, "Which granularity and rule to
# pick"): 60% kept, nested choices in windows of 8 blocks, the first half dense, the loss on the processed positions,
# the predictor. Megatron layers, whose loss is their model's own, take LeMo's values for the keys a section leaves
# out; benchmarks and tests that compare with LeMo's rule start from LEMO_ARTIFACT_SELECTION and add their scorer.
LEMO_ARTIFACT_SELECTION: dict[str, Any] = {"keep_ratio": 0.4, "nested_selection": False, "selection_window": 0,
                                           "dense_layers": "auto", "loss_tokens": "all"}  # fmt: skip
LEMO_ARTIFACT_RULE: dict[str, Any] = {**LEMO_ARTIFACT_SELECTION, "scorer": "oracle"}


class LemoConfig(_LemoSection):
    """Contextual token sparsity (LeMo): which layers drop which blocks of tokens. The defaults are the selection
    rule the README recommends (``LEMO_ARTIFACT_RULE`` holds LeMo's own)."""

    enabled: bool = True
    """Master switch. ``false`` keeps the section (and validates it) but leaves the model dense."""

    block_size: int = Field(64, ge=1, le=65536)
    """Tokens per block: the granularity of elimination. The sequence length must be at least one block."""

    keep_ratio: float | list[float] = 0.6
    """Share of blocks each sparse layer keeps, in (0, 1]. One number for every sparse layer, or one number
    per decoder layer (then its length must equal the model's number of layers, and a layer with 1.0 is
    dense). The default is the lowest ratio that kept held-out perplexity within 1.5% of dense on the accuracy
    benchmark's references (README, "Which granularity and rule to pick"); LeMo's artifact keeps 0.4."""

    dense_layers: Literal["auto", "first_half"] | list[int] = "first_half"
    """Decoder layers that always run on every token. ``"first_half"`` (default): the first half only: with
    ``loss_tokens: "processed"`` a dense last layer would read the skipped rows' shallower states as keys, a mix
    evaluation never shows (README, "Accuracy"); with a list of keep ratios, the layers whose ratio is 1.0, and the
    first half too only where ``"first_half"`` is written out. ``"auto"``:
    the first half and the last layer (the LeMo artifact's choice for 32-layer Llama), or, when ``keep_ratio`` is a
    list, the layers whose ratio is 1.0. A list: those layers. Negative indices count from the end (-1 is the last
    layer)."""

    eliminate: Literal["layer", "attention"] = "layer"
    """What an eliminated block skips in a sparse layer. ``layer``: the whole decoder layer (attention and MLP: its
    row is the layer input, exactly). ``attention``: only the attention sublayer, as in LeMo's artifact: the
    attention (input norm, Q/K/V, RoPE at the true positions, attention among the kept rows, O projection) runs on
    the kept rows and is added to their residual, then the MLP sublayer runs on every row. Attention's cost and
    activations shrink quadratically with the kept share, the MLP's not at all; under activation checkpointing such a
    layer stores its whole input, as a dense layer does (``memory.sparse_checkpointing`` is for ``layer``)."""

    always_keep_blocks: list[int] = Field(default_factory=lambda: [0])
    """Block indices kept in every sparse layer whatever their score (default: the first block, the
    attention sink). Negative indices count from the end. They count toward the kept total."""

    min_blocks: int = Field(1, ge=1)
    """Fewest blocks a sparse layer keeps per sample: k = max(min_blocks, round(keep_ratio * n_blocks))."""

    scorer: Literal["oracle", "random", "norm", "predictor"] = "predictor"
    """How blocks are scored. ``predictor`` (default): learned predictors (LeMo's pattern prediction), from
    ``predictor_path`` or calibrated against the oracle at the start of training; ``oracle``: true informativeness
    from the layer's own queries and keys (positive query-key scores, tile max, column sum), the same quality at a
    higher cost per step (README, "Which scorer to pick"); ``random``: uniform random (the random-LTD baseline);
    ``norm``: mean hidden-state L2 norm of the block (an ablation). Megatron layers have no predictors and default
    to ``oracle``."""

    oracle_chunk_tokens: int = Field(512, ge=1)
    """Query rows the chunked oracle scorer processes at once (rounded up to a multiple of block_size). Its
    working memory is about kv_groups x chunk x seq x 4 bytes."""

    predictor_path: str | None = None
    """File of trained predictors (``scorer: "predictor"``, written by launch/train_predictor.py). Without
    it, predictors are calibrated at the start of training (see ``predictor.calibration_batches``)."""

    predictor: LemoPredictorConfig = Field(default_factory=LemoPredictorConfig)
    """Learned predictors: size, calibration, online refresh."""

    memory: LemoMemoryConfig = Field(default_factory=LemoMemoryConfig)
    """The memory stack (segment loss, sparsity-aware checkpointing, tiled MLP, saved-tensor compaction, checkpoint
    offload)."""

    schedule: LemoScheduleConfig = Field(default_factory=LemoScheduleConfig)
    """Warm-up of the keep ratio (dense steps, then a linear ramp)."""

    loss_tokens: Literal["all", "processed"] = "processed"
    """Which positions the training loss counts. ``processed`` (default): only the positions whose row ran through
    every sparse layer of the forward (with ``eliminate: "attention"``: every sparse layer's attention): the others
    skipped layers, so their predictions come from a shallower network than the dense model that is evaluated, and
    training on them teaches the weights to make up for layers that are there at evaluation. Needs
    ``memory.segment_loss``: with ``memory.segment_loss: false`` the default is ``all``. ``all``: every labelled token
    (LeMo's rule). Megatron layers keep their model's own loss, which counts every token."""

    skipped_loss_weight: float = Field(0.0, ge=0.0, le=1.0)
    """With ``loss_tokens: "processed"``: the weight of the other positions' targets in the loss (0: left out; 1:
    the ``all`` loss). The loss is (sum over processed + weight x sum over the others) / (their weighted count);
    above 0 the LM head runs twice (README, "Accuracy", for what the accuracy benchmark measured)."""

    selection_window: int = Field(8, ge=0)
    """Stratified selection: each window of this many blocks keeps about the keep ratio of its blocks (the
    scorer picks which ones), instead of one top-k over the whole sequence. Column-sum scores (oracle,
    predictor) favour early blocks, which have more queries; a window spreads the kept tokens, and with them the
    positions the ``processed`` loss counts, over every position. 0: one global top-k (LeMo's rule)."""

    nested_selection: bool = True
    """A block that one sparse layer eliminates stays eliminated in the later sparse layers of the same forward
    (token dropping, as in random-LTD): the positions that run through every sparse layer are then exactly the
    last sparse layer's kept share, instead of the intersection of independent choices. ``false``: each sparse layer
    chooses on its own (LeMo's rule)."""

    apply_in_eval: bool = False
    """Eliminate tokens in eval mode too. Default: evaluation and inference are dense."""

    seed: int = Field(0, ge=0)
    """Seed of the random scorer (combined with the layer index, step and micro-batch counter)."""

    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Gather/write-back and scoring implementation. ``auto``: Triton on CUDA tensors, PyTorch elsewhere (also
    under TRITON_INTERPRET=1: the interpreter is for checking the kernels); ``triton``: Triton (CPU tensors only
    under TRITON_INTERPRET=1) or an error; ``torch``: PyTorch only."""

    fused_ops: Literal["auto", "on", "off"] = "auto"
    """RMSNorm, RoPE and the SwiGLU product of every decoder layer (dense and sparse) and the final norm as lemo_ds's
    fused Triton kernels (lemo_ds/fused.py): one pass each, and no float32 or SiLU copies stored for backward.
    ``auto``: on CUDA tensors, the model's own PyTorch ops elsewhere (a CPU run is unchanged); ``on``: the kernels
    everywhere (a CPU needs TRITON_INTERPRET=1, else an error); ``off``: the model's own ops. Families with a policy
    (Llama, Mistral, Qwen2, Qwen3); an MLP whose activation is not SiLU keeps its own forward."""

    inplace_writeback: bool = True
    """Write kept rows back into the residual stream in place when autograd allows it (training, no
    activation checkpointing of the layer, nobody holding the layer input); otherwise into a copy."""

    @field_validator("keep_ratio")
    @classmethod
    def _ratio_in_range(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise ValueError("an empty list; give one number, or one number per decoder layer")
        for ratio in values:
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"{ratio} is out of range; allowed values are in (0, 1]")
        return value

    @model_validator(mode="after")
    def _cross_field_checks(self) -> LemoConfig:
        if self.scorer == "predictor" and self.predictor_path is not None and not self.predictor_path:
            raise ValueError("predictor_path is an empty string; give the path of a predictors file or null")
        if self.loss_tokens == "processed" and not self.memory.segment_loss:
            if "loss_tokens" in self.model_fields_set:
                raise ValueError(
                    'loss_tokens "processed" needs memory.segment_loss true (lemo_ds masks the loss there)'
                )
            self.__dict__["loss_tokens"] = "all"  # the default without lemo_ds's loss (documented on the field)
        if self.skipped_loss_weight > 0 and self.loss_tokens != "processed":
            raise ValueError(
                f'skipped_loss_weight {self.skipped_loss_weight} only applies with loss_tokens "processed" (with '
                '"all" every position already counts fully); set loss_tokens to "processed" or the weight to 0'
            )
        if self.predictor_path is not None and self.scorer != "predictor":
            raise ValueError(f'predictor_path is set but scorer is "{self.scorer}"; set scorer to "predictor"')
        trains = self.predictor.calibration_batches > 0 or self.predictor.refresh_every > 0
        if self.scorer == "predictor" and self.predictor_path is None and not trains:
            raise ValueError(
                'scorer "predictor" without predictor_path, calibration_batches 0 and refresh_every 0: nothing '
                "would train the predictors; give predictor_path or set predictor.calibration_batches >= 1"
            )
        if isinstance(self.keep_ratio, list) and isinstance(self.dense_layers, list):
            for layer in self.dense_layers:
                if -len(self.keep_ratio) <= layer < len(self.keep_ratio) and self.keep_ratio[layer] < 1.0:
                    raise ValueError(
                        f"dense_layers: layer {layer} is dense but keep_ratio[{layer}] = {self.keep_ratio[layer]}; "
                        "set that ratio to 1.0 or drop the layer from dense_layers"
                    )
        return self

    # ---- resolution against a model ---------------------------------------------------------------------

    def layer_keep_ratios(self, num_layers: int) -> list[float]:
        """Target keep ratio of every decoder layer (1.0 for dense layers), checked against the model."""
        first_half = set(range(num_layers // 2))
        if isinstance(self.keep_ratio, list):
            if len(self.keep_ratio) != num_layers:
                raise LemoConfigError(
                    f"lemo.keep_ratio: {len(self.keep_ratio)} values for a model with {num_layers} decoder layers; "
                    f"give exactly {num_layers} values, or one number"
                )
            ratios = list(self.keep_ratio)
            dense = {i for i, r in enumerate(ratios) if r >= 1.0} if isinstance(self.dense_layers, str) else set()
            # A list the user wrote is honoured as written unless dense_layers is set too: the default's first half
            # would silently turn its ratios there into 1.0.
            if self.dense_layers == "first_half" and "dense_layers" in self.model_fields_set:
                dense |= first_half
        else:
            ratios = [float(self.keep_ratio)] * num_layers
            named = {"auto": first_half | {num_layers - 1}, "first_half": first_half}
            dense = named[self.dense_layers] if isinstance(self.dense_layers, str) else set()
        if isinstance(self.dense_layers, list):
            for layer in self.dense_layers:
                if not -num_layers <= layer < num_layers:
                    raise LemoConfigError(
                        f"lemo.dense_layers: layer {layer} does not exist; the model has layers 0..{num_layers - 1} "
                        f"(negative indices from -{num_layers})"
                    )
                dense.add(layer % num_layers)
        return [1.0 if i in dense else ratios[i] for i in range(num_layers)]


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(section)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(item["loc"][:-1])
            lines.append(f"lemo.{where}: unknown key; allowed keys are: {', '.join(allowed)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"lemo.{where}: {message} (got {item.get('input')!r})")
    return 'invalid "lemo" config section:\n  ' + "\n  ".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[DeepSpeedConfigModel] = LemoConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, DeepSpeedConfigModel):
            model = annotation
    return sorted(model.model_fields)


def parse_lemo_config(section: dict[str, Any] | LemoConfig | None) -> LemoConfig | None:
    """Validate one "lemo" section; None stays None. Errors name the key and what is allowed."""
    if section is None or isinstance(section, LemoConfig):
        return section
    if not isinstance(section, dict):
        raise LemoConfigError(f'"lemo" must be a JSON object of settings, got {type(section).__name__}')
    try:
        return LemoConfig(strict=True, **section)
    except ValidationError as error:
        raise LemoConfigError(_format_validation_error(error)) from None


def load_ds_config(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict, from a dict or a JSON/HJSON file path (as deepspeed accepts)."""
    if isinstance(config, dict):
        return dict(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise LemoConfigError(f"DeepSpeed config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            import hjson

            return dict(hjson.loads(text))
        except Exception as error:  # noqa: BLE001 - report the JSON error, which is the one people expect
            raise LemoConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None


def split_ds_config(config: str | os.PathLike | dict[str, Any]) -> tuple[LemoConfig | None, dict[str, Any]]:
    """(validated "lemo" section or None, the DeepSpeed config without it)."""
    ds_config = load_ds_config(config)
    section = ds_config.pop(LEMO_KEY, None)
    return parse_lemo_config(section), ds_config


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def config_reference_markdown() -> str:
    """The "lemo" section as a Markdown table (key, type, default, meaning), from the models' docstrings."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[DeepSpeedConfigModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, DeepSpeedConfigModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            kind = _type_name(annotation).replace("|", "\\|")
            meaning = " ".join((info.description or "").split())
            rows.append(f"| `{prefix}{name}` | `{kind}` | `{json.dumps(default)}` | {meaning} |")

    walk(LemoConfig, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_reference_markdown())
