"""One layer's block-score predictor, and the bank of them (one per sparse layer), in plain PyTorch.

The predictor estimates LeMo's oracle scores (``lemo_ds.kernels.oracle_scores``) from the layer input alone::

    x~_t   = x_t / rms(x_t)                                 token t, [h] (parameter-free: W1 absorbs the norm's gain)
    u_t    = relu(W1q x~_t + b1q), v_t = relu(W1k x~_t + b1k)      [r1q], [r1k]  (per token)
    q^_I   = Wq [max_{t in I} u_t ; mean_{t in I} u_t]             [r2]  (pooled per block, then projected)
    k^_J   = Wk [max_{t in J} v_t ; mean_{t in J} v_t]             [r2]
    T^(I,J) = softplus(q^_I . k^_J / sqrt(r2) + beta[bucket(I - J)])  for allowed block pairs, else 0
    S^(J)  = sum over I of T^(I, J)

``T^`` estimates the oracle's tile maxima normalised by their mean over the allowed tiles of the sample, ``S^``
its block scores in the same unit. Only the ranking of ``S^`` within a sample matters for selection.

Why this shape (measurements: a byte-level Llama, 8 layers, hidden 512, trained briefly on Gutenberg on an H200;
4K-token held-out windows, keep 0.4, layers 4-6, 1024 training windows):

- Per-token first layer, then pooling: a block is informative when one of its tokens is a strong key (the oracle
  takes a max over each 64 x 64 tile), and a mean over 64 tokens dilutes a single token 64-fold; the max of a
  ReLU unit over the block keeps it. The mean keeps the block's average content.
- Block-level products afterwards: O(n^2 r2) per sample (n = s / 64) instead of O(s^2 r) for LeMo-style token-level
  products with a tile max, a plain differentiable matmul to train, and 0.22 ms per layer at 32K tokens on the
  Llama-3-8B shape (kernel and top-k). Recall was the same: 0.953 pooled vs 0.956 token-level (0.950 vs 0.949 on a
  second model).
- beta, a learned bias per log-spaced block distance, carries what the content cannot: RoPE makes near tiles
  (the diagonal) score high whatever the content.
- The column sum is causal and respects documents: only block pairs the layer's attention allows contribute
  (``allowed`` from :func:`block_pair_allowed`), so the positional trend of the oracle (an early block has more
  query blocks below it) comes for free.
- softplus, not ReLU, on the tiles: pooled features are all >= 0, so at initialisation q^ . k^ often has one
  sign for every pair of a sample, and a ReLU there starts dead for good (seen: every score 0, recall below
  random); softplus always passes a gradient.
- x~ is parameter-free: the predictor never reads the model's parameters, so it needs no ZeRO-3 gather, and
  the RMSNorm gain is a per-channel scale that W1 absorbs.

Parameters live outside the model (``PredictorBank`` is owned by the scorer, not a submodule of a decoder
layer): ZeRO-3 must not partition them and the model's optimizer must not train them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lemo_ds.kernels.predictor_scores import pack_predictor

RMS_EPS = 1e-6


@dataclass(frozen=True)
class PredictorDesign:
    """Sizes of a predictor. ``hidden_rank``: ReLU units per side (q and k) before pruning; ``out_rank``: width
    of q^ and k^; ``distance_buckets``: learned biases by log-spaced block distance."""

    hidden_rank: int = 64
    out_rank: int = 32
    distance_buckets: int = 20

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def distance_bucket(distance: torch.Tensor, buckets: int) -> torch.Tensor:
    """Log-spaced bucket of a block distance d >= 0: floor(2 log2(d + 1)), capped at ``buckets - 1`` (20 buckets
    reach d = 723 blocks, 46K tokens at B = 64). Computed by integer thresholds, so it is exact on every device."""
    # d + 1 >= 2^(m/2) for integers  <=>  d + 1 >= ceil(2^(m/2)) = smallest x with x^2 >= 2^m.
    thresholds = [math.isqrt(2**m - 1) + 1 for m in range(1, buckets)]
    limits = torch.tensor(thresholds, device=distance.device)  # [buckets - 1]
    return ((distance.clamp_min(0)[..., None] + 1) >= limits).sum(-1)


def rms_scale(hidden_states: torch.Tensor) -> torch.Tensor:
    """[b, s, h] -> [b, s] float32: 1 / rms of every token, without an fp32 copy of the hidden states."""
    h = hidden_states.shape[-1]
    sumsq = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=torch.float32).square()
    return torch.rsqrt(sumsq / h + RMS_EPS)


def pool_blocks(units: torch.Tensor, block_size: int) -> torch.Tensor:
    """[b, s, r] (>= 0) -> [b, n, 2r]: per block the max and the mean of each unit over the block's tokens (the
    partial tail block averages over its own tokens; zero padding is neutral for the max of ReLU outputs)."""
    batch, seq, rank = units.shape
    n = math.ceil(seq / block_size)
    padded = F.pad(units, (0, 0, 0, n * block_size - seq)).view(batch, n, block_size, rank)  # [b, n, B, r]
    counts = torch.full((n, 1), float(block_size), device=units.device)
    counts[-1] = seq - (n - 1) * block_size
    return torch.cat([padded.amax(2), padded.sum(2) / counts], dim=-1)  # [b, n, 2r]


def block_pair_allowed(
    lo_block: torch.Tensor | None, n: int, batch: int, device: torch.device
) -> torch.Tensor:  # [b, n, n] bool
    """Block pairs (I, J) with at least one attended token pair: J <= I and J >= lo_block[I] (the first key
    block query block I can reach: 0 for plain causal attention, the document's first block when packed)."""
    idx = torch.arange(n, device=device)
    allowed = idx[None, :] <= idx[:, None]  # [n, n] causal
    if lo_block is None:
        return allowed.expand(batch, -1, -1)
    return allowed & (idx[None, None, :] >= lo_block[:, :, None])  # [b, n, n]


class LayerPredictor(nn.Module):
    """The predictor of one decoder layer (see the module docstring). ``hidden_q`` / ``hidden_k``: ReLU units per
    side, smaller than ``design.hidden_rank`` after elastic pruning."""

    def __init__(
        self,
        hidden_size: int,
        design: PredictorDesign,
        hidden_q: int | None = None,
        hidden_k: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.design = design
        r1q = design.hidden_rank if hidden_q is None else hidden_q
        r1k = design.hidden_rank if hidden_k is None else hidden_k
        r2 = design.out_rank
        # A generator of its own: the init is the same on every data-parallel rank and never moves the global RNG
        # (which seeds the model's LoRA init and dropout in the training job).
        gen = torch.Generator().manual_seed(seed)

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) / math.sqrt(max(shape[-1], 1))

        # Unit-variance pre-activations for unit-RMS inputs; the second layer sees 2r1 pooled features.
        self.w1q = nn.Parameter(normal(r1q, hidden_size))  # [r1q, h]
        self.b1q = nn.Parameter(torch.zeros(r1q))
        self.w1k = nn.Parameter(normal(r1k, hidden_size))  # [r1k, h]
        self.b1k = nn.Parameter(torch.zeros(r1k))
        # q^ starts at zero (as LoRA's B): every tile starts at softplus(beta), so the predictor starts at the
        # positional prior (earlier blocks have longer columns) and learns content on top of it. Random init here
        # started below that prior and often stayed there (tiny Llama, 12 calibration batches: recall 0.83 vs 0.95).
        self.wq = nn.Parameter(torch.zeros(r2, 2 * r1q))  # [r2, 2 r1q]
        self.wk = nn.Parameter(normal(r2, 2 * r1k))  # [r2, 2 r1k]
        self.dist_bias = nn.Parameter(torch.zeros(design.distance_buckets))  # [nb]

    @property
    def hidden_units(self) -> tuple[int, int]:
        return self.w1q.shape[0], self.w1k.shape[0]

    def units(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ReLU units of both sides: ([b, s, r1q], [b, s, r1k]) float32. The product with W1 runs in
        the input's dtype and the RMS scale is applied to it (W1 (x / rms) = (W1 x) / rms), as the kernel does."""
        rinv = rms_scale(hidden_states)[..., None]  # [b, s, 1]
        x = hidden_states
        u = F.relu(F.linear(x, self.w1q.to(x.dtype)).float() * rinv + self.b1q)
        v = F.relu(F.linear(x, self.w1k.to(x.dtype)).float() * rinv + self.b1k)
        return u, v

    def block_embeddings(self, hidden_states: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q^ and k^ per block: ([b, n, r2], [b, n, r2])."""
        u, v = self.units(hidden_states)
        return pool_blocks(u, block_size) @ self.wq.t(), pool_blocks(v, block_size) @ self.wk.t()

    def forward(
        self,
        hidden_states: torch.Tensor,  # [b, s, h], the layer input
        block_size: int,
        lo_block: torch.Tensor | None = None,  # [b, n] int: first key block each query block reaches, or None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted tiles [b, n, n] float32, zero outside the allowed pairs; predicted block scores [b, n])."""
        q_hat, k_hat = self.block_embeddings(hidden_states, block_size)  # [b, n, r2] each
        batch, n, r2 = q_hat.shape
        logits = q_hat @ k_hat.transpose(1, 2) / math.sqrt(r2) + self.pair_bias(n, q_hat.device)  # [b, n, n]
        allowed = block_pair_allowed(lo_block, n, batch, q_hat.device)
        tiles = F.softplus(logits) * allowed
        return tiles, tiles.sum(1)

    def dist_table(self, n: int, device: torch.device) -> torch.Tensor:
        """[n]: the learned bias of every block distance 0..n-1."""
        return self.dist_bias[distance_bucket(torch.arange(n, device=device), self.design.distance_buckets)]

    def pair_bias(self, n: int, device: torch.device) -> torch.Tensor:
        """[n, n]: the learned bias of every block pair (I, J) by its distance I - J (pairs above the diagonal get
        distance 0's; the caller masks them)."""
        idx = torch.arange(n, device=device)
        buckets = distance_bucket(idx, self.design.distance_buckets)  # [n], by distance
        pair_buckets = buckets[(idx[:, None] - idx[None, :]).clamp_min(0)]  # [n, n], no gradient
        # An embedding lookup, not dist_bias[pair_buckets]: both gather, but indexing's backward adds the n^2
        # gradients into the few buckets one duplicate at a time, on CUDA 82 ms per predictor update at 128K tokens
        # (93% of the calibration, benchmarks/results/faster-than-hf-liger-20261206); embedding's sorts and reduces.
        return F.embedding(pair_buckets, self.dist_bias[:, None]).squeeze(-1)

    def packed(self, dtype: torch.dtype):
        """The weights in the layout of the inference kernel (lemo_ds.kernels.predictor_scores)."""
        return pack_predictor(self.w1q, self.b1q, self.w1k, self.b1k, self.wq, self.wk, dtype)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PredictorBank(nn.Module):
    """One :class:`LayerPredictor` per sparse decoder layer, keyed by the layer's index."""

    def __init__(
        self, hidden_size: int, design: PredictorDesign, layers: list[int] | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.design = design
        self.predictors = nn.ModuleDict(
            {str(i): LayerPredictor(hidden_size, design, seed=seed * 1009 + i) for i in layers or []}
        )

    @property
    def layers(self) -> list[int]:
        return sorted(int(key) for key in self.predictors)

    def __contains__(self, layer_index: int) -> bool:
        return str(layer_index) in self.predictors

    def get(self, layer_index: int) -> LayerPredictor:
        return self.predictors[str(layer_index)]

    def set(self, layer_index: int, predictor: LayerPredictor) -> None:
        self.predictors[str(layer_index)] = predictor
