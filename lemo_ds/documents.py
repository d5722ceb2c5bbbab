"""Documents of packed rows, described in O(s) memory: a document key per token.

A row may hold several documents (a packed corpus, Hugging Face's ``DataCollatorWithFlattening``, the main job's
own data) and may start or end with padding. Attention is causal within a document and never crosses one. Rather
than a [b, 1, s, s] mask, lemo_ds carries ``Documents``: a key per token [b, s], equal within one document and
different between neighbouring documents (padding is -1), from which every consumer derives what it needs:

- the attention (``lemo_ds.document_attention``): the row's segments, runs of equal keys, each attended causally;
- the oracle scorer: the keys themselves as the kernel's ``doc_ids`` (-1: padding, never a key);
- a sparse layer: the keys of its kept rows (``gather``). Kept rows stay in ascending order, so each document's
  kept tokens are again one run.

Where they come from: ``position_ids`` restarting at 0 (a new document) and the 2D ``attention_mask`` (0 =
padding), the two inputs a Hugging Face causal LM already takes for packed and padded rows; nothing else has to
be passed. A row that holds one document and no padding is the plain causal case (``single``).
"""

from __future__ import annotations

import torch

from lemo_ds.core.selection import num_blocks
from lemo_ds.kernels import doc_ids_from_position_ids


class Documents:
    """Document keys [b, s] int32 of one forward (see the module docstring); segment layouts computed lazily."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys  # [b, s] int32
        self._segments: tuple[torch.Tensor, int, int] | None = None

    @classmethod
    def from_inputs(
        cls,
        position_ids: torch.Tensor | None,  # [b or 1, s]
        attention_mask: torch.Tensor | None,  # [b, s] 2D padding mask (1 = token), or None
        batch: int,
        seq: int,
        device: torch.device,
    ) -> Documents:
        if position_ids is None:
            keys = torch.zeros(batch, seq, dtype=torch.int32, device=device)  # [b, s]
        else:
            keys = doc_ids_from_position_ids(position_ids.to(device)).expand(batch, seq)  # [b, s]
        if attention_mask is not None:
            keys = keys.masked_fill(~attention_mask.to(device=device, dtype=torch.bool), -1)
        return cls(keys.contiguous())

    def gather(self, rows: torch.Tensor) -> Documents:
        """The keys of kept rows [b, K] (ascending): each document's kept tokens form one run again."""
        return Documents(self.keys.gather(1, rows))

    def _run_starts(self) -> torch.Tensor:
        """[b, s] bool: the token starts a run of equal keys (a document, or padding) within its row."""
        starts = torch.ones(self.keys.shape, dtype=torch.bool, device=self.keys.device)  # [b, s]
        starts[:, 1:] = self.keys[:, 1:] != self.keys[:, :-1]
        return starts

    def segments(self) -> tuple[torch.Tensor, int, int]:
        """(cu_seqlens [n_segments + 1] int32 over the flattened b * s tokens, longest segment, n_segments): every
        run of equal keys within a row is one segment; a row boundary always starts one. One host sync, once."""
        if self._segments is None:
            batch, seq = self.keys.shape
            first = self._run_starts().flatten().nonzero().flatten().to(torch.int32)  # [n]
            end = torch.tensor([batch * seq], dtype=torch.int32, device=first.device)
            cu_seqlens = torch.cat([first, end])  # [n + 1]
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if batch * seq else 0
            self._segments = (cu_seqlens, longest, first.numel())
        return self._segments

    @property
    def single(self) -> bool:
        """Every row is one document without padding: attention is plainly causal."""
        return self.segments()[2] == self.keys.shape[0] and bool((self.keys[:, 0] >= 0).all())

    def doc_ids(self) -> torch.Tensor | None:
        """The oracle kernel's ``doc_ids`` [b, s] (-1: padding), or None where attention is plainly causal."""
        return None if self.single else self.keys

    def first_key_block(self, block_size: int) -> torch.Tensor | None:
        """[b, n] int64: for each query block, the first key block its first or last row may attend (the start of
        that row's document), as the predictor's kernel takes it; None where attention is plainly causal."""
        if self.single:
            return None
        batch, seq = self.keys.shape
        position = torch.arange(seq, device=self.keys.device).expand(batch, seq)  # [b, s]
        run_start = torch.where(self._run_starts(), position, 0).cummax(dim=1).values  # [b, s]: its run's first row
        first = torch.arange(num_blocks(seq, block_size), device=self.keys.device) * block_size  # [n]
        last = (first + block_size - 1).clamp(max=seq - 1)  # [n]
        return (torch.minimum(run_start[:, first], run_start[:, last]) // block_size).long()  # [b, n]
