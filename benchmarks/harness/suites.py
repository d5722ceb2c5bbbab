"""The suites: one registry. A suite is a list of configurations (model shape, sequence length) and the
variants compared in each, or (kind "maxctx") a list of longest-context searches.

Add a suite by adding a ``Suite(...)`` to ``SUITES``; add a variant to a suite by naming it (see
``harness.variants.VARIANTS``) or by writing ``Variant(...)`` / ``lemo_variant(...)`` inline.

GPU time (one H200, estimates from GPU.md's figures): foundation ~1.5 min, paper ~3-4 min, long ~7-8 min
(run it in two parts with ``--seq`` if the oracle scorer is slow at 128K), maxctx: several probes of up to a
few minutes each, so run it per variant with ``--budget-s`` and ``--resume`` (see benchmarks/maxctx.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness.variants import Variant, get_variant

K = 1024


@dataclass(frozen=True)
class Config:
    shape: str
    seq: int
    warmup: int | None = None  # None: the suite's (or the command line's) value
    steps: int | None = None
    documents: int = 1  # per row: 1 is one document; more is a packed row (harness.model.random_batch)


@dataclass(frozen=True)
class MaxCtxTarget:
    """One longest-context search: a variant on a shape, 4K granularity, starting at ``start`` tokens."""

    shape: str
    variant: str
    start: int
    granularity: int = 4 * K
    max_seq: int | None = None  # stop growing past this (None: the command line's --max-seq)
    documents: int = 1  # per row, as Config.documents


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    configs: tuple[Config, ...] = ()
    variants: tuple[Variant, ...] = ()
    warmup: int = 1
    steps: int = 3
    dtype: str = "bf16"
    needs_cuda: bool = True
    kind: str = "measure"  # "measure" or "maxctx"
    maxctx: tuple[MaxCtxTarget, ...] = field(default=())


def _variants(*names: str) -> tuple[Variant, ...]:
    return tuple(get_variant(name) for name in names)


def _grid(shapes: tuple[str, ...], seqs: tuple[int, ...]) -> tuple[Config, ...]:
    return tuple(Config(shape, seq) for shape in shapes for seq in seqs)


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            "foundation",
            "Llama-3-8B shape, 32K tokens, HF gradient checkpointing, HF loss, LoRA r=8: dense vs LeMo keep 0.4 "
            "(norm and oracle scorers). Run first.",
            configs=_grid(("llama3-8b",), (32 * K,)),
            variants=_variants("dense+ckpt", "lemo-norm+ckpt", "lemo-oracle+ckpt"),
        ),
        Suite(
            "memory-paper",
            "The memory stack in the paper's setting: Llama-2-7B shape, 8K, no checkpointing, LoRA r=8: dense, LeMo "
            "alone, and dense / LeMo with the exact stack (+exact: segment loss, saved-tensor compaction; no matmul "
            "recomputed in the layers) and the whole stack (+stack: also tiled MLP, which recomputes the MLP per "
            "tile).",
            configs=_grid(("llama2-7b",), (8 * K,)),
            variants=_variants("dense", "dense+exact", "dense+stack", "lemo-oracle", "lemo-oracle+exact",
                               "lemo-oracle+stack"),
        ),
        Suite(
            "memory-long",
            "The memory stack at long context: Llama-3-8B shape, 128K, checkpointing, one measured step: the "
            "strongest dense stack (Liger loss), LeMo with the stack (segment loss, sparsity-aware checkpointing, "
            "tiled MLP, saved-tensor compaction) and with the stack + host offload of the stored layer inputs; the "
            "dense model with the offload stack (like with like) is in the suite but left out by memory_gpu.sh.",
            configs=(Config("llama3-8b", 128 * K, steps=1),),
            variants=_variants("dense+ckpt+chunked-loss", "lemo-oracle+ckpt+stack", "lemo-oracle+ckpt+offload",
                               "dense+ckpt+offload"),
        ),
        Suite(
            "paper",
            "The paper's setting: Llama-2-7B and Llama-3-8B shapes, 4K/8K/16K, no checkpointing, LoRA r=8.",
            configs=_grid(("llama2-7b", "llama3-8b"), (4 * K, 8 * K, 16 * K)),
            variants=_variants("dense", "lemo-norm", "lemo-oracle"),
        ),
        Suite(
            "long",
            "Llama-3-8B shape, 32K/64K/128K with checkpointing; chunked loss (Liger fused linear CE on GPU). "
            "Fewer steps at 128K (one step of the chunked dense stack takes ~50 s) to stay under 10 minutes.",
            configs=(Config("llama3-8b", 32 * K), Config("llama3-8b", 64 * K, steps=2),
                     Config("llama3-8b", 128 * K, steps=1)),
            variants=_variants("dense+ckpt", "dense+ckpt+chunked-loss", "lemo-norm+ckpt+chunked-loss",
                               "lemo-oracle+ckpt+chunked-loss"),
        ),
        Suite(
            "predictor-overhead",
            "The learned predictors' cost in the training step: Llama-3-8B shape, 32K, checkpointing, chunked loss, "
            "keep 0.4. lemo-random does the same sparse work with a free scorer, so predictor minus random is "
            "the predictors' own time (calibrated on the fly in the warm-up step).",
            configs=_grid(("llama3-8b",), (32 * K,)),
            variants=_variants("lemo-random+ckpt+chunked-loss", "lemo-predictor+ckpt+chunked-loss",
                               "lemo-norm+ckpt+chunked-loss", "lemo-oracle+ckpt+chunked-loss"),
            steps=4,
        ),
        Suite(
            "maxctx",
            "Longest context (4K granularity) whose training step fits on one GPU, Llama-3-8B shape: the "
            "strongest dense stack (checkpointing + chunked loss) and the LeMo stack. Each probe is a fresh "
            "process. Starts near GPU.md's extrapolation (128K -> 83.7 GiB, 64K -> 49.4 GiB: ~224K fit).",
            kind="maxctx",
            maxctx=(MaxCtxTarget("llama3-8b", "dense+ckpt+chunked-loss", start=224 * K),
                    MaxCtxTarget("llama3-8b", "lemo-oracle+ckpt+chunked-loss", start=224 * K)),
        ),
        Suite(
            "maxctx-stack",
            "Does the LeMo memory stack fit 2x the strongest dense stack's longest context? Llama-3-8B shape; the "
            "dense reference (maxctx suite, dense+ckpt+chunked-loss) extrapolates to ~232K (GPU.md: 0.54 GiB per 1K "
            "tokens over 15 GiB of weights), so 2x is 464K. One probe each at 464K (max_seq = start): +offload "
            "(device ~80 GiB estimated; host: (17 + 15 x 0.4) x s x 8 KiB = 82 GiB pinned) and +stack without "
            "offload (estimated to need ~150 GiB: expected out of memory, it bounds what offload buys). A probe at "
            "464K takes about 7-9 minutes: run with --probe-timeout 590.",
            kind="maxctx",
            maxctx=(MaxCtxTarget("llama3-8b", "lemo-oracle+ckpt+offload", start=464 * K, granularity=16 * K,
                                 max_seq=464 * K),
                    MaxCtxTarget("llama3-8b", "lemo-oracle+ckpt+stack", start=384 * K, granularity=16 * K,
                                 max_seq=464 * K)),
        ),
        Suite(
            "maxctx-packed",
            "The offload stack's longest context on packed rows (116 documents in 464K tokens, about 4K tokens each, "
            "position ids restarting at each): does it reach what one-document rows reach (maxctx-stack: 464K)? One "
            "probe at 464K, --probe-timeout 590.",
            kind="maxctx",
            maxctx=(MaxCtxTarget("llama3-8b", "lemo-oracle+ckpt+offload", start=464 * K, granularity=16 * K,
                                 max_seq=464 * K, documents=116),),
        ),
        Suite(
            "smoke",
            "A tiny Llama on CPU (or GPU), 256 tokens, every variant kind, for the tests.",
            configs=_grid(("tiny-llama",), (256,)),
            variants=_variants("dense", "dense+ckpt", "dense+ckpt+chunked-loss", "lemo-norm", "lemo-random",
                               "lemo-oracle", "lemo-norm+ckpt", "lemo-oracle+ckpt+chunked-loss", "dense+stack",
                               "lemo-oracle+ckpt+stack", "lemo-oracle+exact", "lemo-oracle+ckpt+offload"),
            warmup=1,
            steps=2,
            dtype="fp32",
            needs_cuda=False,
        ),
        Suite(
            "smoke-maxctx",
            "The longest-context search on the tiny Llama (CPU tests: run it with --mem-cap-gib).",
            kind="maxctx",
            dtype="fp32",
            needs_cuda=False,
            maxctx=(MaxCtxTarget("tiny-llama", "dense+ckpt+chunked-loss", start=2 * K, granularity=2 * K,
                                 max_seq=64 * K),),
        ),
    )
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]

