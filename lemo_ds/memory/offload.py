"""Host offload of the inputs that activation checkpointing stores, with prefetch in backward.

Under activation checkpointing every layer stores its input until backward: at 128K tokens on the Llama-3-8B shape
that is 32 layers x 128K x 4096 x 2 B = 32 GiB for the dense model (lemo_ds's sparse layers store only their kept
rows: (17 + 15 x 0.4) / 32 of it, 23 GiB), the largest item of the long-context peak
(benchmarks/results/memory-long-*).

``CheckpointOffloader.wrap(checkpoint_func)`` works around any checkpoint function that keeps the tensor objects
it is given (PyTorch's reentrant and non-reentrant checkpoint, DeepSpeed's ``checkpointing.checkpoint``):

- forward: each floating-point tensor argument is handed to the checkpoint as a fresh alias (a view); after the
  checkpointed call the alias's data is copied to a pinned host buffer on a side stream and the alias points at
  an empty placeholder, so the device storage is freed as soon as the copy is done (``record_stream``);
- backward: a pre-hook on the checkpoint's output node puts the data back before that node (and the recompute it
  triggers) runs: from a prefetched copy when there is one, else with a copy on the current stream; then it starts
  copying the input of the layer before it (the next one backward needs) on the side stream, so the host-to-device
  traffic overlaps the recompute and backward of this layer instead of serializing with them.

At most two layers' inputs are on the device at a time (the one being recomputed and the prefetched one). Host
buffers are pinned and pooled by shape across steps and models (the first step pays for pinning). Without CUDA (the
tests) the "host" buffer is an ordinary CPU copy and copies are synchronous: the mechanics are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class _Alias(torch.autograd.Function):
    """A new tensor object sharing the input's storage, not a view of it; gradient passes through unchanged.

    Not a view: autograd gives a view returned by a Function a strong reference to its base (``_base``), so pointing
    the view's ``.data`` at a placeholder would leave the input's device storage alive whatever was copied out
    (``view_as`` did so: on the H200 the offloaded 128K run peaked 23 GiB higher, not lower). A detached tensor
    shares the storage without holding the input, which is freed once the caller drops it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


@dataclass(eq=False)
class _Entry:
    aliases: list[torch.Tensor]
    hosts: list[torch.Tensor]
    shapes: list[torch.Size]
    prefetched: list[torch.Tensor] | None = None
    event: Any = None
    restored: bool = False
    index: int = 0


# Pinned host buffers by (shape, dtype), shared by every offloader of the process: a model converted again (the
# benchmark harness re-applies lemo_ds at every switch of variant) does not pin its 23-32 GiB again.
_SHARED_POOL: dict[tuple, list[torch.Tensor]] = {}


@dataclass(eq=False)
class CheckpointOffloader:
    """One per model. ``generation``: a callable giving the model's forward counter (a new forward starts a new list
    of entries, so prefetch follows the current micro-batch)."""

    generation: Callable[[], int] = lambda: 0
    entries: list[_Entry] = field(default_factory=list)
    pool: dict[tuple, list[torch.Tensor]] = field(default_factory=lambda: _SHARED_POOL)
    pinned_bytes: int = 0  # host memory this offloader allocated, for reports
    offloaded_bytes: int = 0  # device bytes moved out by the current forward
    _stream: Any = None
    _generation: int = -1

    def wrap(self, checkpoint_func: Callable[..., Any]) -> Callable[..., Any]:
        def offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return checkpoint_func(function, *args, **kwargs)
            args = tuple(_Alias.apply(a) if _offloadable(a) else a for a in args)
            out = checkpoint_func(function, *args, **kwargs)
            anchor = _first_with_grad_fn(out)
            aliases = [a for a in args if _offloadable(a)]
            if anchor is not None and aliases:
                entry = self._offload(aliases)
                anchor.grad_fn.register_prehook(lambda grad_outputs: self._restore(entry))
            return out

        offloaded.__wrapped__ = checkpoint_func
        return offloaded

    # ---- forward: device -> host ----------------------------------------------------------------------

    def _offload(self, aliases: list[torch.Tensor]) -> _Entry:
        generation = self.generation()
        if generation != self._generation:
            self._generation, self.entries, self.offloaded_bytes = generation, [], 0
        hosts, shapes = [], []
        for alias in aliases:
            data = alias.data
            host = self._host_buffer(data)
            if data.is_cuda:
                stream = self._side_stream(data.device)
                stream.wait_stream(torch.cuda.current_stream(data.device))  # data is complete
                with torch.cuda.stream(stream):
                    host.copy_(data, non_blocking=True)
                data.record_stream(stream)  # its memory is not reused before the copy is done
            else:
                host.copy_(data)
            hosts.append(host)
            shapes.append(data.shape)
            self.offloaded_bytes += data.numel() * data.element_size()
            alias.data = torch.empty(0, dtype=data.dtype, device=data.device)
        entry = _Entry(aliases, hosts, shapes, index=len(self.entries))
        self.entries.append(entry)
        return entry

    # ---- backward: host -> device ---------------------------------------------------------------------

    def _restore(self, entry: _Entry) -> None:
        if entry.restored:
            return
        if entry.prefetched is not None:
            device = entry.prefetched[0].device
            torch.cuda.current_stream(device).wait_event(entry.event)
            for alias, data in zip(entry.aliases, entry.prefetched, strict=True):
                alias.data = data
        else:
            for alias, host, shape in zip(entry.aliases, entry.hosts, entry.shapes, strict=True):
                device = alias.device
                data = torch.empty(shape, dtype=host.dtype, device=device)
                data.copy_(host, non_blocking=device.type == "cuda")  # stream-ordered before the recompute
                alias.data = data
        # The checkpoint holds the aliases as long as its backward needs them; a reference here would keep every
        # restored input on the device until the next forward (H200, 64K: 11 GiB of restored inputs at the peak).
        entry.restored, entry.prefetched, entry.aliases = True, None, []
        self._release(entry)
        previous = self._previous(entry)
        if previous is not None:
            self._prefetch(previous)

    def _previous(self, entry: _Entry) -> _Entry | None:
        if entry.index >= len(self.entries) or self.entries[entry.index] is not entry:
            return None  # an entry of an older forward
        for candidate in reversed(self.entries[: entry.index]):
            if not candidate.restored and candidate.prefetched is None:
                return candidate
        return None

    def _prefetch(self, entry: _Entry) -> None:
        device = entry.aliases[0].device
        if device.type != "cuda":
            return  # synchronous copies: nothing to overlap
        current = torch.cuda.current_stream(device)
        stream = self._side_stream(device)
        prefetched = [torch.empty(shape, dtype=host.dtype, device=device)
                      for host, shape in zip(entry.hosts, entry.shapes, strict=True)]
        stream.wait_stream(current)  # the prefetch buffers are allocated on the current stream
        with torch.cuda.stream(stream):
            for data, host in zip(prefetched, entry.hosts, strict=True):
                data.copy_(host, non_blocking=True)
            entry.event = torch.cuda.Event()
            entry.event.record(stream)
        entry.prefetched = prefetched

    # ---- pinned host buffers --------------------------------------------------------------------------

    def _host_buffer(self, data: torch.Tensor) -> torch.Tensor:
        key = (tuple(data.shape), data.dtype, data.is_cuda)  # pinned buffers for CUDA data only
        free = self.pool.get(key)
        if free:
            return free.pop()
        self.pinned_bytes += data.numel() * data.element_size()
        return torch.empty(data.shape, dtype=data.dtype, device="cpu", pin_memory=data.is_cuda)

    def _release(self, entry: _Entry) -> None:
        # Reused by a later forward's copy on the side stream, which is ordered after this entry's copies back
        # (the side stream waits on the current stream before every offload).
        for host in entry.hosts:
            self.pool.setdefault((tuple(host.shape), host.dtype, host.is_pinned()), []).append(host)
        entry.hosts = []

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


def _offloadable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0


def _first_with_grad_fn(out: Any) -> torch.Tensor | None:
    for value in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            return value
    return None
