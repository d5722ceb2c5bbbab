"""One measured training step, the alternating loop over variants, and out-of-memory as a result.

A training step is: forward + loss + backward of one batch of one sequence, then ``optimizer.step()`` (torch
AdamW over the LoRA parameters), the lemo controller told the step (``set_step``: the predictors of a predictor
variant train there) and ``zero_grad(set_to_none=True)``; the timer covers all of it. On CUDA it is
timed with CUDA events and its peak memory read with ``torch.cuda.max_memory_allocated/reserved`` after
``reset_peak_memory_stats``; on CPU it is timed with ``time.perf_counter`` and memory is not measured (null).

Reserved memory is shared by every variant that ran before in the process (the caching allocator keeps what
it reserved), so ``peak_reserved_gib`` is read on each variant's first step (its warm-up) after
``torch.cuda.empty_cache()``: what that variant alone reserves from a clean cache. Measured steps do not empty
the cache, so their times are steady-state times.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.harness import losses
from benchmarks.harness.flops import mfu, step_flops
from benchmarks.harness.model import Batch, BenchModel
from benchmarks.harness.variants import Variant, activate, deactivate

GIB = 2**30
CPU_MEMORY_NOTE = "no CUDA device: memory is not measured (null); times from time.perf_counter"


# ---- out of memory -------------------------------------------------------------------------------------

def is_oom(error: BaseException) -> bool:
    """A real out-of-memory: CUDA's caching allocator's (torch.cuda.OutOfMemoryError, the same class as
    torch.OutOfMemoryError), CUDA's own outside that allocator (``CUDA error: out of memory``, a RuntimeError: e.g.
    pinned host memory for the offload stack, seen at 520K on the H200 machine), Python's MemoryError, or the CPU
    allocator's failure (a RuntimeError, e.g. under an address-space cap)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in message or
                                                "CUDA error: out of memory" in message)


def _vm_size_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


def _start_cpu_threads() -> None:
    """Run one parallel op so the OpenMP worker threads exist before the address space is capped (a thread
    started under the cap may fail to map its stack, and libgomp aborts the process instead of raising)."""
    a = torch.ones(512, 512)
    (a @ a).sum().item()
    torch.ones(1 << 22).mul_(2.0).sum().item()


class MemoryCap:
    """A real memory limit around each training step, to emulate a smaller device or to provoke an honest OOM.

    CUDA: ``torch.cuda.set_per_process_memory_fraction(cap / total)``: the caching allocator refuses to grow
    past the cap and raises torch.OutOfMemoryError. CPU (Linux): ``RLIMIT_AS`` set to the address space in use
    plus the cap, so allocations past it fail in the CPU allocator. Lifted after the step.
    """

    def __init__(self, gib: float | None, device: torch.device) -> None:
        self.gib = gib
        self.device = device

    def describe(self) -> dict[str, Any] | None:
        if self.gib is None:
            return None
        how = ("torch.cuda.set_per_process_memory_fraction" if self.device.type == "cuda"
               else "RLIMIT_AS = address space in use + cap")
        return {"gib": self.gib, "how": how}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.gib is None:
            yield
            return
        cap = int(self.gib * GIB)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)
            try:
                yield
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            return
        _start_cpu_threads()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size_bytes() + cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- one step ------------------------------------------------------------------------------------------

class StepTimer:
    """CUDA events on the current stream (CUDA) or time.perf_counter (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "cuda-events" if self.cuda else "perf_counter"

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return time.perf_counter() - self._t0


@dataclass
class StepOutcome:
    seconds: float
    loss: float
    peak_allocated: int | None  # bytes
    peak_reserved: int | None  # bytes
    keep_ratio_per_layer: list[float]


class TrainingStep:
    """``step(variant, clean_cache)``: switch the model to the variant and run one measured training step."""

    def __init__(self, bench: BenchModel, batch: Batch, chunked_impl: str, chunk_tokens: int = 1024,
                 cap: MemoryCap | None = None) -> None:
        self.bench = bench
        self.batch = batch
        self.chunked_impl = chunked_impl
        self.chunk_tokens = chunk_tokens
        self.cap = cap or MemoryCap(None, bench.device)
        self.timer = StepTimer(bench.device)

    # (variant.loss, chunked implementation) -> the name recorded as "loss_impl"
    LOSS_IMPL_NAMES = {("hf", "liger"): "hf", ("hf", "torch"): "hf", ("chunked", "liger"): "liger-flce",
                       ("chunked", "torch"): "torch-chunked-ce"}

    def loss_impl(self, variant: Variant) -> str:
        return self.LOSS_IMPL_NAMES[variant.loss, self.chunked_impl]

    def _loss(self, variant: Variant) -> torch.Tensor:
        model = self.bench.model
        if variant.loss == "hf":
            # .loss only: the output object (and its [1, s, V] logits) is dropped at once.
            return model(**self.batch.inputs(), labels=self.batch.labels, use_cache=False).loss
        hidden = losses.final_hidden_states(model, self.bench.decoder, self.batch.inputs())  # [1, s, h]
        return losses.chunked_loss(hidden, self.bench.lm_head_weight, self.batch.labels, self.chunked_impl,
                                   self.chunk_tokens)

    def __call__(self, variant: Variant, clean_cache: bool = False) -> StepOutcome:
        bench = self.bench
        activate(bench, variant, self.batch.documents)
        controller = None
        if variant.is_lemo:
            import lemo_ds  # only lemo variants need it (and it imports DeepSpeed)

            controller = lemo_ds.get_controller(bench.model)
        if controller is not None:
            controller.reset_stats()
        cuda = bench.device.type == "cuda"
        if cuda:
            if clean_cache:
                torch.cuda.empty_cache()
            torch.cuda.synchronize(bench.device)
            torch.cuda.reset_peak_memory_stats(bench.device)
        with self.cap.active():
            self.timer.start()
            loss = self._loss(variant)
            loss.backward()
            bench.optimizer.step()
            if controller is not None:  # the step taken: lemo_ds's step hooks (the predictors' training) run here
                controller.set_step(controller.step + 1)
            bench.optimizer.zero_grad(set_to_none=True)
            seconds = self.timer.stop()
        peak_allocated = torch.cuda.max_memory_allocated(bench.device) if cuda else None
        peak_reserved = torch.cuda.max_memory_reserved(bench.device) if cuda else None
        ratios = controller.stats()["keep_ratio_per_layer"] if controller is not None else [1.0] * bench.shape.layers
        return StepOutcome(seconds, float(loss.detach().float().item()), peak_allocated, peak_reserved, list(ratios))

    def cleanup(self) -> None:
        """After an OOM: drop gradients and lemo_ds's per-layer state, then give cached memory back."""
        self.bench.optimizer.zero_grad(set_to_none=True)
        deactivate(self.bench)
        gc.collect()
        if self.bench.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- the alternating loop -----------------------------------------------------------------------------

@dataclass
class VariantRun:
    variant: Variant
    outcomes: list[StepOutcome] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    clean_reserved: int | None = None
    oom: bool = False
    oom_phase: str | None = None
    oom_error: str | None = None
    oom_inferred_from_seq: int | None = None
    error: str | None = None

    @property
    def stopped(self) -> bool:
        return self.oom or self.error is not None


StepFn = Callable[[Variant, bool], StepOutcome]


def _attempt(step: StepFn, cleanup: Callable[[], None], run: VariantRun, clean_cache: bool, phase: str,
             log: Callable[[str], None]) -> StepOutcome | None:
    """One step; an OOM (or another error) becomes part of ``run`` and the loop goes on with the others."""
    message = None
    try:
        return step(run.variant, clean_cache)
    except Exception as exc:  # noqa: BLE001 - recorded, not swallowed: see run.error / run.oom
        first_line = (str(exc).strip().splitlines() or [""])[0][:400]
        message = f"{type(exc).__name__}: {first_line}"
        if is_oom(exc):
            run.oom, run.oom_phase, run.oom_error = True, phase, message
            log(f"    {run.variant.name}: out of memory in {phase} ({message[:120]})")
        else:
            run.error = "".join(traceback.format_exception(exc))[-4000:]
            log(f"    {run.variant.name}: ERROR in {phase}: {message}")
    # Outside the except block the exception and its frames (which hold tensors) are gone.
    cleanup()
    return None


def measure_configuration(step: StepFn, cleanup: Callable[[], None], variants: list[Variant], warmup: int,
                          steps: int, log: Callable[[str], None] = print,
                          after_round: Callable[[dict[str, VariantRun]], None] | None = None,
                          inferred_oom: dict[str, int] | None = None) -> dict[str, VariantRun]:
    """Warm up each variant, then measure rounds A, B, C, A, B, C, ... (``steps`` rounds).

    ``inferred_oom``: variants known to run out of memory (at a shorter sequence, name -> that length); they
    are recorded as OOM without running. A variant that runs out of memory stops; the others go on.
    """
    runs = {variant.name: VariantRun(variant) for variant in variants}
    for name, seq in (inferred_oom or {}).items():
        if name in runs:
            runs[name].oom, runs[name].oom_phase, runs[name].oom_inferred_from_seq = True, "inferred", seq
    for variant in variants:
        run = runs[variant.name]
        for index in range(warmup):
            if run.stopped:
                break
            outcome = _attempt(step, cleanup, run, clean_cache=index == 0, phase="warmup", log=log)
            if outcome is not None:
                run.warmup_s.append(outcome.seconds)
                if index == 0:
                    run.clean_reserved = outcome.peak_reserved
                log(f"    warm-up {variant.name}: {outcome.seconds:.3f} s")
    for round_index in range(steps):
        for variant in variants:
            run = runs[variant.name]
            if run.stopped:
                continue
            first = warmup == 0 and round_index == 0
            outcome = _attempt(step, cleanup, run, clean_cache=first, phase="step", log=log)
            if outcome is None:
                continue
            if first:
                run.clean_reserved = outcome.peak_reserved
            run.outcomes.append(outcome)
            memory = "" if outcome.peak_allocated is None else f", peak {outcome.peak_allocated / GIB:.2f} GiB"
            log(f"    step {round_index + 1}/{steps} {variant.name}: {outcome.seconds:.3f} s{memory}")
        if after_round is not None:
            after_round(runs)
    return runs


# ---- summaries -----------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def summarize(run: VariantRun, shape, seq: int, lora_rank: int, peak_flops: float | None, loss_impl: str,
              timing: str, cuda: bool) -> dict[str, Any]:
    """The JSON record of one variant in one configuration. Every key is present; unknown figures are null."""
    outcomes = run.outcomes
    times = [o.seconds for o in outcomes]
    median = percentile(times, 50)
    ratios = None
    if outcomes:
        per_step = [o.keep_ratio_per_layer for o in outcomes]
        ratios = [sum(column) / len(column) for column in zip(*per_step, strict=True)]
    flops = step_flops(shape, seq, ratios, lora_rank) if ratios else None
    allocated = [o.peak_allocated for o in outcomes if o.peak_allocated is not None]
    reserved = [o.peak_reserved for o in outcomes if o.peak_reserved is not None]
    return {
        **run.variant.describe(),
        "loss_impl": loss_impl,
        "oom": run.oom,
        "oom_phase": run.oom_phase,
        "oom_error": run.oom_error,
        "oom_inferred_from_seq": run.oom_inferred_from_seq,
        "error": run.error,
        "steps": len(outcomes),
        "timing": timing,
        "step_time_s": {"median": median, "p20": percentile(times, 20), "p80": percentile(times, 80),
                        "values": times},
        "warmup_s": run.warmup_s,
        "tokens_per_s": seq / median if median else None,
        "peak_allocated_gib": _gib(max(allocated)) if allocated else None,
        "peak_allocated_gib_steps": [_gib(a) for a in allocated],
        "peak_reserved_gib": _gib(run.clean_reserved),
        "peak_reserved_gib_steps_max": _gib(max(reserved)) if reserved else None,
        "memory_note": None if cuda else CPU_MEMORY_NOTE,
        "mean_keep_ratio": sum(ratios) / len(ratios) if ratios else None,
        "keep_ratio_per_layer": ratios,
        "model_flops": flops["model_flops"] if flops else None,
        "model_flops_frozen": flops["model_flops_frozen"] if flops else None,
        "flops_parts": {k: v for k, v in flops.items() if k.startswith("part_")} if flops else None,
        "mfu": mfu(flops["model_flops"], median, peak_flops) if flops else None,
        "mfu_frozen": mfu(flops["model_flops_frozen"], median, peak_flops) if flops else None,
        "loss_value": sum(o.loss for o in outcomes) / len(outcomes) if outcomes else None,
    }
