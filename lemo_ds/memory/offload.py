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

At most two layers' inputs are on the device at a time (the one being recomputed and the prefetched one), besides
those of the first ``resident`` layers, which stay there (spare device memory taking what the host has no room for).

Fewer stored inputs (``layers_per_stored_input`` k > 1, for lengths where the host runs out): of k consecutive
dense layers whose inputs are each the previous one's output, only the first stores its input; the input of each
of the others is rebuilt in backward, right before its checkpoint recomputes, by running the layer below it again
without grad from that layer's input. Host memory for the dense layers' inputs drops to 1/k, at the cost of k - 1
more layer forwards per group; the device holds the same two inputs at k = 2 (the one rebuilt, and the one it was
rebuilt from, which backward needs next anyway) and k - 2 more above that.

Host buffers are page-locked and pooled across steps and models (the first step pays for pinning), by capacity
rather than by shape (``HostPool``): a sparse layer's kept rows change in number from step to step on packed rows,
and a pool keyed by shape pinned a new buffer for every new count and kept the old ones, growing without bound.
Page-locked either by PyTorch's pinned allocator (a power of two per buffer) or, with ``memory.pinned_buffers:
"registered"``, by cudaHostRegister on ordinary host memory (about the input's size: ``host_capacity``). Without
CUDA (the tests) the "host" buffer is an ordinary CPU copy and copies are synchronous: the mechanics are the same.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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


# Kinds of host buffer: "pageable" (CPU runs: the copies are synchronous), and the two of memory.pinned_buffers (the
# config's values are these names): "power_of_two" (PyTorch's caching host allocator, which rounds every block up to a
# power of two), "registered" (ordinary host memory page-locked by cudaHostRegister, sized by host_capacity: under 1/8
# over the request beyond 16 MiB).
HOST_KINDS = ("pageable", "power_of_two", "registered")
REGISTERED_GRANULES = 16  # granule = power of two / 16: the request is over half of it, so the waste is under 1/8
_MIB = 1 << 20


def pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def host_capacity(nbytes: int, kind: str) -> int:
    """Bytes a host buffer of ``kind`` takes for a request of ``nbytes`` (the planner counts the same).

    power_of_two: the power of two PyTorch's caching host allocator gives (its ``pinned_max_round_threshold`` is
    unlimited by default): a dense layer's 4.0 GiB input at 512K takes 4 GiB, at 520K 8 GiB. registered: rounded up to a
    sixteenth of that power of two (at least 2 MiB), under 1/8 over the request beyond 16 MiB, so a sparse layer's
    kept rows, which vary by a few blocks from step to step, still mostly fit an earlier step's buffer. pageable:
    exact."""
    if kind == "power_of_two":
        return pow2_ceil(nbytes)
    if kind == "registered":
        granule = max(2 * _MIB, pow2_ceil(nbytes) // REGISTERED_GRANULES)
        return -(-nbytes // granule) * granule
    return nbytes


# cudaHostRegister's errors a user can act on (the rest are reported by number).
_REGISTER_ERRORS = {
    2: "out of memory: the host's memory or its locked-memory limit (ulimit -l) is spent",
    712: "part of the range is registered already",
}
_REGISTRATIONS: dict[int, weakref.finalize] = {}  # address -> unregistering that buffer, run at most once


def _registered_empty(nbytes: int) -> torch.Tensor:
    """A flat uint8 host buffer of ``nbytes`` (a multiple of the page size), page-locked by cudaHostRegister.

    The memory is an anonymous mapping of its own, not the CPU allocator's: a malloc'd block can share a page with
    another block, and registering a page twice fails (error 712). The buffer is unregistered when the pool frees it
    (``_unregister``) or, failing that, when its memory is collected: a range freed while still registered and later
    mapped again at the same address fails the same way (seen on an H100 the first time this path ran)."""
    memory = mmap.mmap(-1, nbytes)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)  # [nbytes]; holds `memory`
    address = buffer.data_ptr()
    error = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))
    if error:
        reason = _REGISTER_ERRORS.get(error, "see the CUDA runtime's error codes")
        raise RuntimeError(f"lemo_ds: cudaHostRegister of {nbytes / _MIB:.0f} MiB of host memory failed (CUDA error "
                           f"{error}: {reason}); memory.pinned_buffers \"power_of_two\" uses PyTorch's pinned "
                           "allocator instead")
    finalizer = weakref.finalize(memory, _unregister_address, address)
    finalizer.atexit = False  # at exit the CUDA context goes with the process
    _REGISTRATIONS[address] = finalizer
    return buffer


def _unregister_address(address: int) -> None:
    _REGISTRATIONS.pop(address, None)
    # A copy from it may still be in flight on a stream: page-locking ends only once the device is done with it.
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(address)


def _unregister(buffer: torch.Tensor) -> None:
    """Unregister a buffer of ``_registered_empty`` now, before its memory is unmapped."""
    finalizer = _REGISTRATIONS.get(buffer.data_ptr())
    if finalizer is not None:
        finalizer()


@dataclass(eq=False)
class HostPool:
    """Host buffers (flat bytes) that the offloaded inputs are copied into, reused by capacity, per kind
    (``HOST_KINDS``; each buffer takes ``host_capacity`` bytes).

    ``acquire`` hands out the smallest free buffer of the kind that holds the request. Where none does, every free
    buffer of that kind is smaller than the request: they are freed (power_of_two: and the host allocator's cache
    emptied; registered: unregistered) before a new one is allocated. So the pool never holds more buffers than the most
    inputs offloaded at once, each within its kind's rounding of the largest input it was made for, whatever the
    shapes do from step to step (a sparse layer's kept rows change in number from step to step on packed rows)."""

    free: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {kind: [] for kind in HOST_KINDS})
    allocated_bytes: int = 0  # every buffer of the pool, in use or free

    def acquire(self, nbytes: int, kind: str) -> torch.Tensor:
        """A flat uint8 host buffer of at least ``nbytes``."""
        free = self.free[kind]
        fitting = [i for i, buffer in enumerate(free) if buffer.numel() >= nbytes]
        if fitting:
            return free.pop(min(fitting, key=lambda i: free[i].numel()))
        if free:  # all smaller than this request: buffers of earlier steps' shapes
            self.allocated_bytes -= sum(buffer.numel() for buffer in free)
            if kind == "registered":
                for buffer in free:
                    _unregister(buffer)
            free.clear()
            if kind == "power_of_two" and hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()  # the allocator caches freed pinned blocks: give them back
        capacity = host_capacity(nbytes, kind)
        self.allocated_bytes += capacity
        if kind == "registered":
            return _registered_empty(capacity)
        return torch.empty(capacity, dtype=torch.uint8, device="cpu", pin_memory=kind == "power_of_two")

    def release(self, buffer: torch.Tensor, kind: str) -> None:
        self.free[kind].append(buffer)


@dataclass(eq=False)
class _Entry:
    aliases: list[torch.Tensor]
    hosts: list[torch.Tensor]  # views of ``buffers`` shaped as the inputs
    buffers: list[torch.Tensor]  # the pool's flat buffers behind ``hosts``
    kinds: list[str]  # each buffer's kind in the pool
    shapes: list[torch.Size]
    prefetched: list[torch.Tensor] | None = None
    event: Any = None
    restored: bool = False
    index: int = 0
    source: _Entry | None = None  # set: nothing stored; the input is the output of ``source.rerun`` (the layer below)
    group_position: int = 0  # 0: stores its input; i: the i-th layer above the one that does
    rerun: Callable[[], Any] | None = None  # this layer's function on its inputs (a rebuildable layer, until restored)
    prefetch_started: bool = False  # its restore has started copying the input backward needs next


# Shared by every offloader of the process: a model converted again (the benchmark harness re-applies lemo_ds at
# every switch of variant) does not pin its 23-32 GiB again.
_SHARED_POOL = HostPool()


@dataclass(eq=False)
class CheckpointOffloader:
    """One per model. ``generation``: a callable giving the model's forward counter (a new forward starts a new list
    of entries, so prefetch follows the current micro-batch). ``pinned_kind``: the host buffers of CUDA data,
    the config's ``memory.pinned_buffers``, "power_of_two" or "registered" (``host_capacity``). ``resident``: the first
    that many checkpointed calls of each forward (the first decoder layers) keep their inputs on the device
    (``memory.resident_checkpoints``). ``layers_per_stored_input``: k of ``memory.layers_per_stored_input`` (the
    module docstring)."""

    generation: Callable[[], int] = lambda: 0
    pinned_kind: str = "power_of_two"
    resident: int = 0
    layers_per_stored_input: int = 1
    entries: list[_Entry] = field(default_factory=list)
    pool: HostPool = field(default_factory=lambda: _SHARED_POOL)
    offloaded_bytes: int = 0  # device bytes moved out by the current forward
    _stream: Any = None
    _generation: int = -1
    _calls: int = 0  # checkpointed calls of the current forward
    # The entry and output of the last rebuildable call, and the output's version, held until the next call compares
    # its input with it: alive, its storage cannot have become another tensor's.
    _last_output: tuple[_Entry, torch.Tensor, int] | None = None

    @property
    def rebuilt_inputs(self) -> int:
        """Inputs of the current forward left to be rebuilt in backward."""
        return sum(entry.source is not None for entry in self.entries)

    def wrap(self, checkpoint_func: Callable[..., Any], rebuildable: bool = False) -> Callable[..., Any]:
        """``checkpoint_func`` with its stored inputs offloaded. ``rebuildable``: the function is a whole dense layer,
        which can run again to rebuild its output where that is the next such call's input
        (``layers_per_stored_input``)."""

        def offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return checkpoint_func(function, *args, **kwargs)
            self._follow_forward()
            self._calls += 1
            source = self._source(args) if rebuildable else None
            self._last_output = None
            if self._calls <= self.resident:
                return checkpoint_func(function, *args, **kwargs)
            args = tuple(_Alias.apply(a) if _offloadable(a) else a for a in args)
            out = checkpoint_func(function, *args, **kwargs)
            anchor = _first_with_grad_fn(out)
            aliases = [a for a in args if _offloadable(a)]
            if anchor is not None and aliases:
                entry = self._offload(aliases) if source is None else self._leave_to_rebuild(aliases, source)
                anchor.grad_fn.register_prehook(lambda grad_outputs: self._restore(entry))
                if rebuildable and self.layers_per_stored_input > 1 and len(aliases) == 1:
                    entry.rerun = partial(function, *args)  # the aliases: the input, once restored
                    self._last_output = (entry, anchor, anchor._version)
            return out

        offloaded.__wrapped__ = checkpoint_func
        return offloaded

    # ---- forward: device -> host ----------------------------------------------------------------------

    def _follow_forward(self) -> None:
        generation = self.generation()
        if generation != self._generation:
            self._generation, self.entries, self.offloaded_bytes, self._calls = generation, [], 0, 0
            self._last_output = None

    def _source(self, args: tuple[Any, ...]) -> _Entry | None:
        """The entry of the last rebuildable call when its output is this call's one input (the same storage,
        unchanged since) and its group has room for one more layer (``layers_per_stored_input``)."""
        inputs = [a for a in args if _offloadable(a)]
        if self._last_output is None or len(inputs) != 1:
            return None
        entry, output, version = self._last_output
        x = inputs[0]
        same = (
            x.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
            and x.storage_offset() == output.storage_offset()
            and x.shape == output.shape
            and x.stride() == output.stride()
            and x.dtype == output.dtype
            and x._version == version == output._version
        )
        if not same or entry.group_position + 1 >= self.layers_per_stored_input:
            return None
        return entry

    def _leave_to_rebuild(self, aliases: list[torch.Tensor], source: _Entry) -> _Entry:
        """Store nothing: backward rebuilds the input from ``source`` (``_materialize``)."""
        shapes = [alias.shape for alias in aliases]
        for alias in aliases:
            _release(alias)
        entry = _Entry(aliases, [], [], [], shapes, index=len(self.entries), source=source,
                       group_position=source.group_position + 1)  # fmt: skip
        self.entries.append(entry)
        return entry

    def _offload(self, aliases: list[torch.Tensor]) -> _Entry:
        hosts, buffers, kinds, shapes = [], [], [], []
        for alias in aliases:
            data = alias.data
            nbytes = data.numel() * data.element_size()
            kind = self.pinned_kind if data.is_cuda else "pageable"  # page-locked buffers for CUDA data only
            buffer = self.pool.acquire(nbytes, kind)
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
            kinds.append(kind)
            shapes.append(data.shape)
            self.offloaded_bytes += data.numel() * data.element_size()
            _release(alias)
        entry = _Entry(aliases, hosts, buffers, kinds, shapes, index=len(self.entries))
        self.entries.append(entry)
        return entry

    # ---- backward: host -> device ---------------------------------------------------------------------

    def _restore(self, entry: _Entry) -> None:
        """Before the entry's checkpoint recomputes: its inputs on the device, and the stored input backward needs
        next on its way."""
        self._last_output = None  # backward has begun: no call of this forward compares with it any more
        self._materialize(entry)
        if entry.prefetch_started:
            return
        entry.prefetch_started = True
        previous = self._previous(entry)
        if previous is not None:
            self._prefetch(previous)

    def _materialize(self, entry: _Entry) -> None:
        """The entry's inputs on the device: copied back (or taken from the prefetch), or rebuilt."""
        if entry.restored:
            return
        if entry.source is not None:  # rebuilt: the layer below runs again on its own input, put back first
            rerun = entry.source.rerun  # taken before materializing the source, which drops it
            if rerun is None:
                raise RuntimeError("lemo_ds: the layer whose output is this layer's input ran its backward first")
            self._materialize(entry.source)
            with torch.no_grad():
                out = rerun()
            del rerun
            data = out[0] if isinstance(out, (tuple, list)) else out
            (alias,) = entry.aliases
            if data.shape != entry.shapes[0] or data.dtype != alias.dtype:
                raise RuntimeError(f"lemo_ds: rebuilding a layer's input gave {tuple(data.shape)} {data.dtype}, not "
                                   f"{tuple(entry.shapes[0])} {alias.dtype}")
            alias.data = data
            entry.restored, entry.aliases, entry.rerun = True, [], None
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
        # ``rerun`` holds them too.
        entry.restored, entry.prefetched, entry.aliases, entry.rerun = True, None, [], None
        self._release(entry)

    def _previous(self, entry: _Entry) -> _Entry | None:
        """The stored entry below, which backward copies back next (inputs rebuilt in between come from it), unless
        it is on the device already or on its way."""
        if entry.index >= len(self.entries) or self.entries[entry.index] is not entry:
            return None  # an entry of an older forward
        for candidate in reversed(self.entries[: entry.index]):
            if candidate.source is None:
                return None if candidate.restored or candidate.prefetched is not None else candidate
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
        for buffer, kind in zip(entry.buffers, entry.kinds, strict=True):
            self.pool.release(buffer, kind)
        entry.hosts, entry.buffers, entry.kinds = [], [], []

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


def _release(alias: torch.Tensor) -> None:
    """Point ``alias`` at an empty placeholder: its device storage goes once nothing else holds it."""
    alias.data = torch.empty(0, dtype=alias.dtype, device=alias.device)


def _offloadable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0


def _first_with_grad_fn(out: Any) -> torch.Tensor | None:
    for value in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            return value
    return None
