"""Does a job fit, and if not, the cheapest change that does; the longest sequence that fits; memory budgets.

Changes are tried cumulatively, cheapest first (what each costs, README "The lemo config section"):
1. activation checkpointing (a recompute of every layer; only when the job has it off);
2. memory.offload_checkpoints (no recompute; host memory and PCIe copies, hidden behind compute);
3. memory.segment_loss (exact; one more LM-head pass per segment);
4. memory.tiled_mlp (one more MLP forward per layer);
5. memory.pinned_buffers "registered" (offloaded inputs page-locked at about their size: host memory only);
6. memory.resident_checkpoints 1, 2, 4, 8 then 16 (the first layers' inputs stay on the device: no copies, device
   memory instead of host memory);
7. memory.layers_per_stored_input 2, 3 then 4 (one more forward of every dense layer whose output is not stored;
   host memory for the dense layers' inputs / k, k - 2 more on the device);
8. ZeRO-3's parameter offload of the frozen base, zero_optimization.offload_param (LoRA under ZeRO-3 only: every
   layer's weights cross PCIe in forward, recompute and backward; host memory instead of device memory; not yet
   measured on a GPU);
9. a lower keep_ratio, 0.5, 0.4 (LeMo's), 0.3, 0.2 then 0.1, those below the job's (changes what the sparse layers
   train on: accuracy; README, "Which granularity and rule to pick").
Of the changes tried, the plan keeps those the fit needs. Resident layers and fewer stored inputs only relieve the
host: they are tried only where the host is short, and taken only while the device still fits.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lemo_ds.plan.memory import GIB, Prediction, Setup, Shape, device_fits, fits, pieces_from, predict

RESIDENT_STEPS = (1, 2, 4, 8, 16)  # memory.resident_checkpoints values the search tries, in order
STORED_INPUT_STEPS = (2, 3, 4)  # memory.layers_per_stored_input values the search tries, in order
# Settings that only apply with offload_checkpoints.
OFFLOAD_SETTINGS = ("memory.pinned_buffers", "memory.resident_checkpoints", "memory.layers_per_stored_input")
HOST_RELIEF = ("memory.resident_checkpoints", "memory.layers_per_stored_input")  # host memory for device or time

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_TOKENS = re.compile(r"^\s*(\d+)\s*([KM]?)\s*$", re.IGNORECASE)
MAX_SEARCH_TOKENS = 1 << 26  # 64M tokens: the longest length --seq-len max considers


def parse_bytes(text: str) -> int:
    """'80GiB', '80G', '128GB' (decimal), '1MiB', '1048576' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a memory size; write it like 80GiB, 128GB or 512MiB")
    number, prefix, suffix = float(match[1]), match[2].upper(), match[3].lower()
    base = 1000 if suffix == "b" else 1024  # "GB": decimal; "GiB" or "G": binary
    return int(number * base ** "KMGT".find(prefix) * base) if prefix else int(number)


def parse_tokens(text: str) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '4096' -> 4096."""
    match = _TOKENS.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a sequence length; write it like 4096, 32K or 1M")
    return int(match[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20}[match[2].upper()]


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name == key:
                return int(value.split()[0]) * 1024
    raise KeyError(key)


def _local_ranks() -> int:
    """Ranks of this job on this machine (the launchers set LOCAL_WORLD_SIZE; one without it: 1)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_gpu_mem(device: str) -> int:
    """This rank's device memory: its CUDA device's total; on a CPU run the host's RAM (MemTotal) shared by the ranks
    on this machine. Totals, not what is free now: every rank must reach the same verdict before any collective."""
    if device == "cuda":
        import torch

        local_rank = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return torch.cuda.get_device_properties(local_rank).total_memory
    return meminfo("MemTotal") // _local_ranks()


def default_host_mem() -> int:
    """This rank's share of the host's RAM (MemTotal over the ranks on this machine)."""
    return meminfo("MemTotal") // _local_ranks() if os.path.exists("/proc/meminfo") else 1 << 62


@dataclass(frozen=True)
class Change:
    what: str  # words for the message
    apply: Callable[[Setup], Setup]
    section: dict = field(default_factory=dict)  # keys of the "lemo" section it sets (dotted for memory.*)
    flag: str | None = None  # a launcher flag instead of a config key
    ds_keys: dict = field(default_factory=dict)  # keys of the DeepSpeed config itself it sets (dotted)


def _set(**kw) -> Callable[[Setup], Setup]:
    return lambda s: dataclasses.replace(s, **kw)


def _keep(ratio: float) -> Callable[[Setup], Setup]:
    return lambda s: dataclasses.replace(s, keep_ratios=tuple(r if r >= 1.0 else min(r, ratio) for r in s.keep_ratios))


def changes(setup: Setup) -> list[Change]:
    """The candidate changes in order of cost, those the job does not have yet."""
    out = []
    if not setup.checkpointing:
        out.append(Change("activation checkpointing", _set(checkpointing=True), flag="--grad-ckpt deepspeed"))
    if not setup.offload_checkpoints:
        out.append(Change("offload_checkpoints", _set(offload_checkpoints=True), {"memory.offload_checkpoints": True}))
    if not setup.segment_loss:
        out.append(Change("segment_loss", _set(segment_loss=True), {"memory.segment_loss": True}))
    if not setup.tiled_mlp:
        out.append(Change("tiled_mlp", _set(tiled_mlp=True), {"memory.tiled_mlp": True}))
    if setup.pinned_buffers != "registered":  # after offload (above), which it needs: host memory, not the device's
        out.append(Change("pinned_buffers registered", _set(pinned_buffers="registered"),
                          {"memory.pinned_buffers": "registered"}))  # fmt: skip
    for layers in RESIDENT_STEPS:  # host memory short, device memory to spare: keep the first layers' inputs there
        if layers > setup.resident_checkpoints:
            out.append(Change(f"resident_checkpoints {layers}", _set(resident_checkpoints=layers),
                              {"memory.resident_checkpoints": layers}))  # fmt: skip
    for k in STORED_INPUT_STEPS:  # host memory short: one dense layer in k stores its input, the others rebuild
        if k > setup.layers_per_stored_input:
            out.append(Change(f"layers_per_stored_input {k}", _set(layers_per_stored_input=k),
                              {"memory.layers_per_stored_input": k}))  # fmt: skip
    if setup.device == "cuda" and setup.zero_stage == 3 and setup.lora_r > 0 and setup.offload_params is None:
        out.append(Change("offload_param cpu", _set(offload_params="cpu"),
                          ds_keys={"zero_optimization.offload_param": {"device": "cpu", "pin_memory": True}}))
    if any(r < 1.0 for r in setup.keep_ratios):
        current = min(setup.keep_ratios)
        for ratio in (0.5, 0.4, 0.3, 0.2, 0.1):
            if ratio < current:
                out.append(Change(f"keep_ratio {ratio}", _keep(ratio), {"keep_ratio": ratio}))
    return out


@dataclass(frozen=True)
class Plan:
    prediction: Prediction
    fits: bool
    applied: tuple[Change, ...] = ()  # the changes (cumulative) that make it fit; empty when it fits as given
    fitting: Prediction | None = None  # the prediction with them
    found: bool = True  # False: nothing in the search fits

    def section(self, lemo_section: dict | None) -> dict:
        """The "lemo" section with the plan's changes, to paste into the DeepSpeed config."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (lemo_section or {}).items()}
        for change in self.applied:
            for key, value in change.section.items():
                if key.startswith("memory."):
                    out.setdefault("memory", {})[key.split(".", 1)[1]] = value
                else:
                    out[key] = value
        return out

    def flags(self) -> list[str]:
        return [c.flag for c in self.applied if c.flag]

    def ds_sections(self, ds_config: dict) -> dict:
        """The DeepSpeed config's top-level sections that the plan changes (e.g. "zero_optimization"), each whole
        with the change, to paste beside the "lemo" section; empty when the plan changes none."""
        out: dict = {}
        for change in self.applied:
            for key, value in change.ds_keys.items():
                top, *rest = key.split(".")
                section = out.setdefault(top, dict(ds_config.get(top) or {}))
                for part in rest[:-1]:
                    section = section.setdefault(part, {})
                section[rest[-1]] = value
        return out


def plan(shape: Shape, setup: Setup, gpu_mem: int, host_mem: int) -> Plan:
    first = predict(shape, setup)
    if fits(first, gpu_mem, host_mem, setup.device):
        return Plan(first, True)
    applied, current, candidate = [], setup, first
    for change in changes(setup):
        # Host relief costs device memory or step time: tried only where the host is short, kept only while the
        # device still fits.
        relief = any(key in HOST_RELIEF for key in change.section)
        if relief and candidate.host_bytes <= host_mem:
            continue
        trial_setup = change.apply(current)
        trial = predict(shape, trial_setup)
        if relief and not device_fits(trial, gpu_mem, setup.device):
            continue
        current, candidate = trial_setup, trial
        applied.append(change)
        if fits(candidate, gpu_mem, host_mem, setup.device):
            needed = _needed(shape, setup, applied, gpu_mem, host_mem)
            return Plan(first, False, tuple(needed), predict(shape, _apply(setup, needed)))
    return Plan(first, False, tuple(applied), predict(shape, current), found=False)


def _apply(setup: Setup, applied: list[Change]) -> Setup:
    for change in applied:
        setup = change.apply(setup)
    return setup


def _needed(shape: Shape, setup: Setup, applied: list[Change], gpu_mem: int, host_mem: int) -> list[Change]:
    """``applied`` without the earlier changes the fit does not need (the last one is what made it fit): e.g. registered
    pinned buffers, tried before a lower keep ratio, where the device and not the host was short."""
    needed = list(applied)
    for change in reversed(applied[:-1]):
        without = [c for c in needed if c is not change]
        if fits(predict(shape, _apply(setup, without)), gpu_mem, host_mem, setup.device):
            needed = without
    if not _apply(setup, needed).offload_checkpoints:  # the offload settings do nothing (and are refused) without it
        needed = [c for c in needed if not any(key in OFFLOAD_SETTINGS for key in c.section)]
    return needed


def longest_fit(shape: Shape, setup: Setup, gpu_mem: int, host_mem: int, multiple: int = 64) -> int:
    """The longest sequence length (a multiple of ``multiple``) whose prediction fits; 0 if not even one does.
    The prediction grows with the length except where attention starts to run in pieces (it drops there:
    ``pieces_from``), so a bisection on each side finds it."""

    def ok(n: int) -> bool:
        return fits(predict(shape, dataclasses.replace(setup, seq_len=n * multiple)), gpu_mem, host_mem, setup.device)

    def bisect(low: int, high: int) -> int:  # the last n in [low, high] that fits, given that low - 1 fits (or 0)
        if ok(high):
            return high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if ok(mid) else (low, mid)
        return low

    top = MAX_SEARCH_TOKENS // multiple
    split = pieces_from(shape, setup)
    if split is None or split // multiple >= top:
        return bisect(0, top) * multiple
    first = -(-split // multiple)  # the first multiple that runs in pieces
    beyond = bisect(first, top) if ok(first) else 0
    return (beyond or bisect(0, first - 1)) * multiple


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"
