"""The planner's memory model: predicted peak device and host memory of one training step of launch/train.py.

Notation, per rank: s = tokens of a row on this rank (seq_len / sequence_parallel_size, times the micro-batch),
h = hidden size, I = MLP intermediate size, V = vocabulary, L = decoder layers, b = bytes of the training dtype
(2 for bf16), P = parameters of the base model, T = trainable parameters (LoRA r on q/k/v/o, or P for full
fine-tuning), W = data-parallel ranks. A layer's "stored input" is what activation checkpointing keeps of it:
s x h x b for a dense layer, its kept rows (keep_ratio x s, whole blocks) for a sparse layer.

    device peak = weights + trainable + stored_inputs + max(layer_backward, loss) + CONSTANT
    host        = HOST_PROCESS + offloaded_inputs

- weights: P x b (ZeRO-3: P x b / W plus two gathered decoder layers, the one computing and the one prefetched).
  With ZeRO-3's parameter offload (zero_optimization.offload_param) the partitions live on the host (pinned: each
  parameter a power of two there, counted in host) and the device holds the two gathered decoder layers and the
  largest other module (the embedding or the LM head, V x h x b): not yet measured, so not calibrated.
- trainable: T x 16 bytes (bf16 weight and gradient, float32 master weight and Adam's two moments); ZeRO 1/2/3
  partition the 12 optimizer bytes / the gradient too / the weight too over W.
- stored_inputs: with checkpointing, the sum of the layers' stored inputs (on the host instead with
  offload_checkpoints, where the device holds only the two in flight: the layer being recomputed and the one
  prefetched, and those of the first resident_checkpoints layers, which stay); without checkpointing every layer
  keeps its whole backward working set (keep_ratio x s of it for a sparse layer): an uncalibrated upper estimate.
- layer_backward: the recompute and backward of one dense decoder layer at s tokens,
  s x (A_H x h + 6 x I) x b + attention_backward: the MLP's gate, up, product and their three gradients ([s, I]
  each), A_H x h elements for everything else (the residual gradients, LoRA, norms), A_H fitted on the committed
  measurements (below), and the flash attention backward: the gradients dq [s, H, d], dk and dv [s, KV, d], and
  what the kernel holds beside them, its float32 dQ accumulator (4 x s x H x d bytes) and, for grouped-query heads,
  dk and dv expanded to every query head (2 x s x H x d x b). Past torch's flash kernels' 32-bit limit the
  attention runs in pieces (lemo_ds.attention_pieces, CUDA, 16-bit): the accumulator, the expanded gradients and
  the piece's own gradients are one piece's (PIECE_ELEMENT_LIMIT elements of queries), not the whole row's, plus the
  float32 sum of a piece's query gradients over its key chunks (a document split by queries; the model counts one
  document a row, so packed rows of short documents are predicted that much high). LoRA
  adapters held in float32 beside a bf16 model (peft's default; launch/train.py casts them to the training dtype)
  add LORA_FLOAT32_BYTES x h per token: each adapted projection (q, k, v, o: input width h) keeps a float32 copy of
  its input for the backward. Tiled MLP: the
  MLP's share is one tile's (tiled_mlp_tokens) plus the tiling's full-length input gradient, output and output
  gradient (3 x h x b per token). Without the fused kernels (fused_ops off, or any CPU run) the norms' float32
  copies and SiLU's output add 8 x h + I x b per token (0 when compact_saves recomputes them).
- loss (at its own moment of the step, so max with layer_backward, not a sum): the segment loss holds one
  segment's float32 logits and their gradient (segment x V x 8 bytes, Liger's chunk s / ceil(V / h) rows on
  CUDA) plus the hidden states' gradient (s x h x b); Hugging Face's loss holds the whole [s, V] logits in b
  bytes, their float32 upcast, log-softmax and gradient (s x V x (b + 12)): what plain DeepSpeed's out-of-memory
  message reported at 64K (96.22 GiB allocated, 31.31 GiB more asked: benchmarks/results/packed-rows-20261202/).
- CONSTANT: what the step allocates beside these (DeepSpeed's buckets, scorer, allocator rounding), fitted.
- layers_per_stored_input k: of each run of consecutive dense layers only every k-th stores its input (on the host);
  the others' are rebuilt in backward from it, with k - 2 more inputs on the device at once.
- offloaded_inputs: the stored inputs in page-locked host buffers, each rounded up to a power of two (PyTorch's
  caching host allocator does so: this, not the device, stopped the packed-row max-context search at 520K), or with
  memory.pinned_buffers "registered" to a sixteenth of that power of two (lemo_ds.memory.offload.host_capacity).
- HOST_PROCESS: the Python process with torch, CUDA and DeepSpeed loaded (an assumption, not fitted).

The device peak is what ``torch.cuda.max_memory_allocated`` measures; a job fits when it is at most the device's
memory less RESERVE_SHARE (CUDA context, allocator fragmentation), and its host bytes at most the host's memory.

Calibration: benchmarks/planner_calibration.py reads the committed benchmark results and writes
benchmarks/results/planner-calibration.json (case, config, measured peak, prediction, error). The constants below
are copied from that file's "fit" block; the planner never reads benchmarks/ at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lemo_ds.attention_pieces import PIECE_ELEMENT_LIMIT, accumulator_rows, first_tokens_in_pieces
from lemo_ds.memory.offload import host_capacity, pow2_ceil

GIB = 1 << 30

# Fitted by benchmarks/planner_calibration.py (benchmarks/results/planner-calibration.json, "fit"): the main job's
# H100 cases (zero3_lemo.json with bf16 adapters, 64K and 128K packed rows) give a dense layer's backward, besides its
# MLP, its flash attention backward and any float32 LoRA copies, of A_H x h elements per token. (Before the attention
# term was stated, A_H was fitted to 5.513 on the same cases: the attention term is 5.5 x h of them for Llama-3-8B's
# heads, so the layer's peak is its attention backward.)
A_H = 0.013
CONSTANT_BYTES = 188_350_976  # 0.175 GiB
# peft's float32 adapters on q, k, v, o: a float32 copy of each projection's input ([s, h], 4 bytes) per adapter.
# Removing them (50ffd31) lowered the main job's peak by 16 x h bytes per token at 64K and at 128K.
LORA_FLOAT32_BYTES = 4 * 4
# The tiled MLP's full-length share, in elements of h per token of a dense layer. Unfused (the harness's compact
# path, checked at 128K and 464K): 3, the tiling's input gradient, output and output gradient. On the fused kernels
# under ZeRO-3 (the main job with memory.tiled_mlp) the layer holds more at full length: fitted on the main job's
# 256K and 384K H100 probes (benchmarks/results/longest-context-20261207/). What it is has not been profiled yet.
TILED_FULL_LENGTH_H = 3.0
TILED_FULL_LENGTH_H_FUSED = 10.282
# Not fitted: stated assumptions.
HOST_PROCESS_BYTES = 6 * GIB  # Python + torch + CUDA runtime + DeepSpeed resident on the host
RESERVE_SHARE = 0.05  # device memory not available to tensors (CUDA context, fragmentation)
ADAM_STATE_BYTES = 12  # float32 master weight + two moments per trainable parameter


@dataclass(frozen=True)
class Shape:
    """What the memory model needs of a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        """The shape of a Llama-like decoder (gated MLP of ``intermediate_size``); ValueError naming what a config
        of another kind lacks."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        missing = [name for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size") if getattr(text, name, None) is None]  # fmt: skip
        if missing:
            raise ValueError(
                f"the memory planner models Llama-like decoders; model type {getattr(text, 'model_type', '?')!r} has "
                f"no {', '.join(missing)}"
            )
        heads = text.num_attention_heads
        return cls(
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            vocab=text.vocab_size,
            tied=bool(getattr(text, "tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_param_sizes(self) -> list[int]:
        """Elements of each parameter tensor of a decoder layer: q, k, v, o; gate, up, down; the two norms."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [h * h, h * kv, h * kv, h * h, h * i, h * i, h * i, h, h]

    def layer_params(self) -> int:
        return sum(self.layer_param_sizes())

    def param_sizes(self) -> list[int]:
        """Elements of each parameter tensor of the model: the layers', the embeddings (one if tied), the final norm."""
        embeddings = [self.vocab * self.hidden] * (1 if self.tied else 2)
        return self.layer_param_sizes() * self.layers + embeddings + [self.hidden]

    def params(self) -> int:
        return sum(self.param_sizes())

    def lora_params(self, rank: int) -> int:
        """LoRA on q/k/v/o: r x (in + out) per projection."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return self.layers * rank * ((h + h) * 2 + (h + kv) * 2)


@dataclass(frozen=True)
class Setup:
    """One job as the memory model sees it (the DeepSpeed config and the "lemo" section reduced to what costs
    memory). ``keep_ratios``: one per decoder layer, 1.0 for dense layers (all 1.0 without lemo)."""

    seq_len: int
    keep_ratios: tuple[float, ...]
    block_size: int = 64
    dtype_bytes: int = 2
    lora_r: int = 8
    lora_float32: bool = False  # adapters in float32 on a lower-precision model (peft's default; not launch/train.py)
    zero_stage: int = 3
    offload_params: str | None = None  # ZeRO-3's offload_param device ("cpu", "nvme") or None
    world_size: int = 1
    sp: int = 1
    micro_batch: int = 1
    checkpointing: bool = True
    sparse_checkpointing: bool = True
    offload_checkpoints: bool = False
    pinned_buffers: str = "power_of_two"  # memory.pinned_buffers: "power_of_two" or "registered"
    resident_checkpoints: int = 0  # memory.resident_checkpoints: the first layers' stored inputs stay on the device
    layers_per_stored_input: int = 1  # memory.layers_per_stored_input: one dense layer in k stores its input
    segment_loss: bool = True
    segment_tokens: int = 4096
    liger_loss: bool = False  # Liger's fused linear cross-entropy (CUDA with liger-kernel)
    tiled_mlp: bool = False
    tiled_mlp_tokens: int = 8192
    fused_ops: bool = True  # lemo_ds's Triton RMSNorm/RoPE/SwiGLU (CUDA only)
    compact_saves: bool = False
    attention_pieces: bool = True  # past the flash limit, attention in pieces (False: runs before they existed)
    device: str = "cuda"


@dataclass(frozen=True)
class Prediction:
    device_bytes: int  # peak allocated on the accelerator (on a CPU run: the process's tensors in RAM)
    host_bytes: int  # pinned offload buffers + the process itself
    terms: dict[str, int] = field(default_factory=dict)  # name -> bytes; device terms then "host.*" terms


def kept_rows(seq: int, ratio: float, block_size: int) -> int:
    """Rows a layer of this keep ratio processes at ``seq`` tokens (whole blocks, at least one)."""
    if ratio >= 1.0:
        return seq
    blocks = math.ceil(seq / block_size)
    return min(seq, max(1, round(ratio * blocks)) * block_size)


def _pieced_rows(shape: Shape, setup: Setup) -> int | None:
    """The fewest tokens per rank whose attention runs in pieces (lemo_ds.attention_pieces: CUDA, 16-bit), or None;
    the model counts one document a row (packed rows switch a little earlier, by 128 rows per document)."""
    if not (setup.attention_pieces and setup.device == "cuda" and setup.dtype_bytes == 2):
        return None
    return first_tokens_in_pieces(1, shape.heads, shape.head_dim)


def attention_backward_bytes(shape: Shape, setup: Setup, rows: int) -> int:
    """The flash attention backward of one layer at ``rows`` tokens: its gradients and the kernel's working set,
    one piece's past the 32-bit limit (see the module docstring)."""
    heads, kv, d, b = shape.heads, shape.kv_heads, shape.head_dim, setup.dtype_bytes

    def gradients(n: int) -> int:  # dq [n, H, d], dk and dv [n, KV, d]
        return n * d * (heads + 2 * kv) * b

    def working(n: int) -> int:  # float32 dQ accumulator; dk and dv expanded to the query heads (grouped queries)
        return n * d * heads * (4 + (2 * b if kv != heads else 0))

    pieced = _pieced_rows(shape, setup)
    if pieced is not None and rows >= pieced:
        piece = accumulator_rows(heads, d, PIECE_ELEMENT_LIMIT)
        # + the float32 sum of a split document's query gradients over its key chunks (one document a row)
        return gradients(rows) + gradients(piece) + working(piece) + piece * heads * d * 4
    return gradients(rows) + working(rows)


def pieces_from(shape: Shape, setup: Setup) -> int | None:
    """The shortest --seq-len whose dense layers run attention in pieces (``attention_backward_bytes``), or None where
    they never do. The prediction drops there: it grows with the length on each side, not across."""
    pieced = _pieced_rows(shape, setup)
    return None if pieced is None else math.ceil(pieced * max(1, setup.sp) / setup.micro_batch)


def layer_backward_bytes(shape: Shape, setup: Setup, rows: int) -> int:
    """One decoder layer's recompute + backward working set at ``rows`` tokens (see the module docstring)."""
    h, i, b = shape.hidden, shape.intermediate, setup.dtype_bytes
    mlp_rows = min(rows, setup.tiled_mlp_tokens) if setup.tiled_mlp else rows
    per_layer = A_H * h * b * rows + 6 * i * b * mlp_rows + attention_backward_bytes(shape, setup, rows)
    if setup.tiled_mlp:
        full_length = TILED_FULL_LENGTH_H_FUSED if setup.fused_ops else TILED_FULL_LENGTH_H
        per_layer += full_length * h * b * rows
    if not (setup.fused_ops or setup.compact_saves):
        per_layer += (8 * h + i * b) * rows
    if setup.lora_r > 0 and setup.lora_float32 and b < 4:
        per_layer += LORA_FLOAT32_BYTES * h * rows
    return int(per_layer)


def loss_bytes(shape: Shape, setup: Setup, s: int) -> int:
    h, v, b = shape.hidden, shape.vocab, setup.dtype_bytes
    if not setup.segment_loss:
        return s * v * (b + 12)
    chunk = min(s, pow2_ceil(math.ceil(s / math.ceil(v / h)))) if setup.liger_loss else min(s, setup.segment_tokens)
    return chunk * v * 8 + s * h * b


def rebuilt_inputs(ratios: tuple[float, ...], k: int) -> list[bool]:
    """Per offloaded layer (keep ratios in layer order): whether memory.layers_per_stored_input ``k`` leaves its input
    to be rebuilt instead of stored: in each run of consecutive dense layers, all but every k-th from the run's start
    (lemo_ds.memory.offload)."""
    out, position = [], -1
    for ratio in ratios:
        position = position + 1 if ratio >= 1.0 else -1
        out.append(position > 0 and position % k != 0)
    return out


def _longest_dense_run(ratios: tuple[float, ...]) -> int:
    longest = run = 0
    for ratio in ratios:
        run = run + 1 if ratio >= 1.0 else 0
        longest = max(longest, run)
    return longest


def predict(shape: Shape, setup: Setup) -> Prediction:
    """The predicted peak of one training step (formula and terms: the module docstring)."""
    b, w = setup.dtype_bytes, max(1, setup.world_size)
    s = setup.seq_len // max(1, setup.sp) * setup.micro_batch
    stage = setup.zero_stage
    weights = shape.params() * b
    if stage == 3:
        weights = weights // w + (2 * shape.layer_params() * b if w > 1 else 0)
    trainable_params = shape.lora_params(setup.lora_r) if setup.lora_r > 0 else shape.params()
    opt_bytes = ADAM_STATE_BYTES / w if stage >= 1 else ADAM_STATE_BYTES
    grad_bytes = b / w if stage >= 2 else b
    param_bytes = b / w if stage >= 3 else b
    trainable = int(trainable_params * (opt_bytes + grad_bytes + param_bytes))
    if setup.lora_r == 0 and stage == 3:
        weights = 0  # full fine-tuning: the weights are the trainable parameters, counted there
    host_params = 0
    if setup.offload_params and stage == 3 and setup.lora_r > 0 and setup.device == "cuda":  # CPU: host is device
        weights = (2 * shape.layer_params() + shape.vocab * shape.hidden) * b
        if setup.offload_params == "cpu":
            host_params = sum(pow2_ceil(n * b) for n in shape.param_sizes()) // w

    ratios = setup.keep_ratios
    rows = [kept_rows(s, r, setup.block_size) for r in ratios]
    stored_rows = rows if setup.sparse_checkpointing else [s] * len(rows)
    backward = layer_backward_bytes(shape, setup, max(rows))
    host_offload = 0
    if not setup.checkpointing:
        stored, stored_name = sum(layer_backward_bytes(shape, setup, r) for r in rows), "activations (no checkpointing)"
        backward = 0
    elif setup.offload_checkpoints:
        first = setup.resident_checkpoints
        resident, offloaded = stored_rows[:first], stored_rows[first:]
        rebuilt = rebuilt_inputs(ratios[first:], setup.layers_per_stored_input)
        # A rebuilt input and the one it is rebuilt from are the two in flight; k > 2 holds the k - 2 between.
        group = min(setup.layers_per_stored_input, _longest_dense_run(ratios[first:])) if any(rebuilt) else 0
        between = max(0, group - 2)
        on_device = resident + sorted(offloaded)[-2:] + [s] * between
        stored = sum(n * shape.hidden * b for n in on_device)
        stored_name = "stored inputs resident and in flight" if resident else "stored inputs in flight (offloaded)"
        on_host = [n for n, r in zip(offloaded, rebuilt, strict=True) if not r]
        if setup.device == "cuda":
            host_offload = sum(host_capacity(n * shape.hidden * b, setup.pinned_buffers) for n in on_host)
        else:  # no pinned memory: the host copies live in the same RAM
            host_offload = sum(n * shape.hidden * b for n in on_host)
    else:
        stored, stored_name = sum(n * shape.hidden * b for n in stored_rows), "stored inputs"
    loss = loss_bytes(shape, setup, s)
    terms = {
        "weights": int(weights),
        "trainable + optimizer": trainable,
        stored_name: int(stored),
        "layer backward" if backward >= loss else "loss": int(max(backward, loss)),
        "constant": int(CONSTANT_BYTES),
    }
    device = sum(terms.values())
    host_terms = {"host.process": HOST_PROCESS_BYTES, "host.offloaded inputs": int(host_offload)}
    if host_params:
        host_terms["host.offloaded parameters"] = int(host_params)
    return Prediction(device_bytes=device, host_bytes=sum(host_terms.values()), terms={**terms, **host_terms})


def device_fits(prediction: Prediction, gpu_mem: int, device: str = "cuda") -> bool:
    """Device peak within the device's memory less RESERVE_SHARE. On a CPU run the device is the host: the offloaded
    inputs count there too."""
    usable = gpu_mem * (1 - RESERVE_SHARE)
    if device != "cuda":
        return prediction.device_bytes + prediction.terms.get("host.offloaded inputs", 0) <= usable
    return prediction.device_bytes <= usable


def host_fits(prediction: Prediction, host_mem: int, device: str = "cuda") -> bool:
    """On a CUDA run the host bytes within the host's memory; on a CPU run always (everything must fit in the RAM
    budget, which ``device_fits`` checks)."""
    return device != "cuda" or prediction.host_bytes <= host_mem


def fits(prediction: Prediction, gpu_mem: int, host_mem: int, device: str = "cuda") -> bool:
    """``device_fits`` and ``host_fits``."""
    return device_fits(prediction, gpu_mem, device) and host_fits(prediction, host_mem, device)
