"""The sparse step, written once: what a sparse layer does with its input, for both granularities.

A layer kind provides a ``SparseLayout`` (how to score its input, gather kept rows with their arguments, run its
sublayers and write back, in its own tensor layout): the Hugging Face decoder layer's (``lemo_ds.decoder_layer``,
``[b, s, h]``, RoPE as cos/sin, masks or document keys) and Megatron-core's (``lemo_ds.megatron.layer``,
``[s, b, h]``, RoPE as angles, packed ``thd`` rows). ``sparse_step`` runs, in this order:

1. the keep ratio (given by the caller, computed once per call): 1.0 runs the layer dense;
2. what the layout cannot do on a subset of tokens (a KV cache, ...) is refused; the row length is checked;
3. the selection: the forward's one in a checkpoint's recompute, else the plan chooses from the layout's scores
   (every tensor-parallel rank agreeing) and keeps it for the recompute;
4. the kept rows [b, K] and their layer arguments are gathered;
5. ``eliminate: "layer"``: the whole layer runs on them; ``"attention"``: the attention sublayer runs on them and is
   added to their residual;
6. the kept share is counted, and the kept rows are written back (in place where the plan and the layout allow);
7. ``"attention"`` only: the MLP sublayer runs on every row.

Eliminated rows are the layer input exactly (``layer``), or the layer input plus nothing from attention and then
the MLP like every row (``attention``), in forward and backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

from lemo_ds.core.selection import token_index

if TYPE_CHECKING:
    from lemo_ds.core.plan import SparsePlan
    from lemo_ds.sequence_parallel import SequenceParallel


class SparseLayout(Protocol):
    """A layer kind's side of the sparse step."""

    seq: int  # tokens per row (this rank's shard under sequence parallelism)
    shard: SequenceParallel | None  # this rank's sequence-parallel shard, or None

    def run_dense(self) -> Any:
        """The layer on every row (the keep ratio is 1.0)."""

    def refuse_unsupported(self) -> None:
        """Raise LemoInputError for inputs a sparse layer cannot honour (a KV cache, ...)."""

    def scores(self) -> torch.Tensor:
        """[b, n] block scores of the layer input (called under no_grad)."""

    def agree(self, blocks: torch.Tensor) -> None:
        """Make every tensor-parallel rank keep the same blocks [b, k] (in place)."""

    def gather(self, rows: torch.Tensor) -> Any:
        """The kept rows [b, K] of the layer input with their layer arguments."""

    def run_layer(self, kept: Any) -> torch.Tensor:
        """The whole layer on the kept rows: their outputs."""

    def run_attention(self, kept: Any) -> torch.Tensor:
        """The kept rows after the attention sublayer and its residual add."""

    def may_overwrite_input(self) -> bool:
        """The layout allows writing back into the layer input itself (nothing of its own keeps it)."""

    def write_back(self, kept_out: torch.Tensor, rows: torch.Tensor, inplace: bool) -> torch.Tensor:
        """The layer input with the kept rows [b, K] replaced by ``kept_out``."""

    def run_mlp(self, hidden: torch.Tensor) -> Any:
        """Every row through the MLP sublayer and its residual add: the layer's output."""


def sparse_step(plan: SparsePlan, layout: SparseLayout, ratio: float, training: bool, *, checkpointed: bool,
                key: object | None = None) -> Any:  # fmt: skip
    """The layer's output for ``layout``'s input (see the module docstring). ``checkpointed``: this call runs under an
    activation checkpoint whose recompute will call it again, and ``key`` (if any) names its saved selection."""
    if ratio >= 1.0:  # a dense phase of the schedule, or evaluation
        plan.account_dense(layout.seq, training)
        return layout.run_dense()
    layout.refuse_unsupported()
    plan.check_length(layout.seq, layout.shard)
    blocks = plan.recalled(checkpointed, key)  # [b, k], or None: choose now
    if blocks is None:
        with torch.no_grad():
            blocks = plan.choose(layout.scores(), layout.seq, ratio, layout.shard)
            layout.agree(blocks)
        plan.remember(blocks, checkpointed, key)
    rows = token_index(blocks, plan.config.block_size, layout.seq)  # [b, K] ascending
    kept = layout.gather(rows)
    attention_only = plan.config.eliminate == "attention"
    kept_out = layout.run_attention(kept) if attention_only else layout.run_layer(kept)
    plan.account(blocks, rows, layout.seq, training)
    out = layout.write_back(kept_out, rows, inplace=plan.writes_in_place() and layout.may_overwrite_input())
    return layout.run_mlp(out) if attention_only else out
