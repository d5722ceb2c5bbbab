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
buffers are pinned and pooled across steps and models (the first step pays for pinning), by capacity rather than by
shape (``HostPool``): a sparse layer's kept rows change in number from step to step on packed rows, and a pool
keyed by shape pinned a new buffer for every new count and kept the old ones, growing without bound. Without CUDA
(the tests) the "host" buffer is an ordinary CPU copy and copies are synchronous: the mechanics are the same.
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
class HostPool:
    """Host buffers (flat bytes; pinned for CUDA data) that the offloaded inputs are copied into, reused by capacity.

    Pinned capacities are powers of two: PyTorch's CUDA host allocator rounds every pinned allocation up to one (its
    ``pinned_max_round_threshold`` is unlimited by default), so a buffer takes the whole block it is given, and a
    sparse layer's kept rows, which vary by a few blocks between steps, fit the buffer of an earlier step (the
    planner counts these powers of two: lemo_ds/plan/memory.py). Unpinned buffers (CPU runs) are exact.
    ``acquire`` hands out the smallest free buffer that holds the request. Where none does, every free buffer of that
    kind is smaller than the request: they are freed (and the host allocator's cache emptied) before a new one is
    allocated. So the pool never holds more buffers than the most inputs offloaded at once, each under twice the
    largest input it was made for, whatever the shapes do from step to step."""

    free: dict[bool, list[torch.Tensor]] = field(default_factory=lambda: {False: [], True: []})
    allocated_bytes: int = 0  # every buffer of the pool, in use or free

    def acquire(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """A flat uint8 host buffer of at least ``nbytes``."""
        free = self.free[pinned]
        fitting = [i for i, buffer in enumerate(free) if buffer.numel() >= nbytes]
        if fitting:
            return free.pop(min(fitting, key=lambda i: free[i].numel()))
        if free:  # all smaller than this request: buffers of earlier steps' shapes
            self.allocated_bytes -= sum(buffer.numel() for buffer in free)
            free.clear()
            if pinned and hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()  # the allocator caches freed pinned blocks: give them back
        capacity = 1 << max(nbytes - 1, 0).bit_length() if pinned else nbytes
        self.allocated_bytes += capacity
        return torch.empty(capacity, dtype=torch.uint8, device="cpu", pin_memory=pinned)

    def release(self, buffer: torch.Tensor) -> None:
        self.free[buffer.is_pinned()].append(buffer)


@dataclass(eq=False)
class _Entry:
    aliases: list[torch.Tensor]
    hosts: list[torch.Tensor]  # views of ``buffers`` shaped as the inputs
    buffers: list[torch.Tensor]  # the pool's flat buffers behind ``hosts``
    shapes: list[torch.Size]
    prefetched: list[torch.Tensor] | None = None
    event: Any = None
    restored: bool = False
    index: int = 0


# Shared by every offloader of the process: a model converted again (the benchmark harness re-applies lemo_ds at
# every switch of variant) does not pin its 23-32 GiB again.
_SHARED_POOL = HostPool()


@dataclass(eq=False)
class CheckpointOffloader:
    """One per model. ``generation``: a callable giving the model's forward counter (a new forward starts a new list
    of entries, so prefetch follows the current micro-batch)."""

    generation: Callable[[], int] = lambda: 0
    entries: list[_Entry] = field(default_factory=list)
    pool: HostPool = field(default_factory=lambda: _SHARED_POOL)
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
        hosts, buffers, shapes = [], [], []
        for alias in aliases:
            data = alias.data
            nbytes = data.numel() * data.element_size()
            buffer = self.pool.acquire(nbytes, pinned=data.is_cuda)  # pinned buffers for CUDA data only
            host = buffer[:nbytes].view(data.dtype).view(data.shape)
            if data.is_cuda:
                stream = self._side_stream(data.device)
                stream.wait_stream(torch.cuda.current_stream(data.device))  # data is complete
                with torch.cuda.stream(stream):
                    host.copy_(data, non_blocking=True)
                data.record_stream(stream)  # its memory is not reused before the copy is done
            else:
                host.copy_(data)
            hosts.append(host)
            buffers.append(buffer)
            shapes.append(data.shape)
            self.offloaded_bytes += data.numel() * data.element_size()
            alias.data = torch.empty(0, dtype=data.dtype, device=data.device)
        entry = _Entry(aliases, hosts, buffers, shapes, index=len(self.entries))
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

    def _release(self, entry: _Entry) -> None:
        # Reused by a later forward's copy on the side stream, which is ordered after this entry's copies back
        # (the side stream waits on the current stream before every offload).
        for buffer in entry.buffers:
            self.pool.release(buffer)
        entry.hosts, entry.buffers = [], []

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
