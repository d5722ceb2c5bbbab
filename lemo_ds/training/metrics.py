"""Per-step metrics (OUTPUT_DIR/metrics.jsonl), the run summary (OUTPUT_DIR/summary.json), peak memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lemo_ds import atomic_io


def peak_memory(device_type: str) -> tuple[int, str]:
    """(bytes, kind): the accelerator's peak allocation on CUDA, else this process's peak resident set."""
    if device_type == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return _peak_rss_bytes(), "host_max_rss"


def _peak_rss_bytes() -> int:
    """This process's peak resident set: /proc/self/status's VmHWM on Linux, which starts afresh at exec.
    getrusage's ru_maxrss is kept across execve, so a job started from a larger process (a test runner's worker
    grown to 1.3 GB) reported that process's size, whatever the job held (CI: two lengths, the same peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def take_keep_ratios(controller: Any, num_layers: int) -> torch.Tensor:
    """Measured kept-token share per decoder layer since the last call, and the count restarts: [L] float32
    (all 1.0 without lemo, ``controller`` None)."""
    if controller is None:
        return torch.ones(num_layers)
    stats = controller.stats()
    controller.reset_stats()
    return torch.tensor(stats["keep_ratio_per_layer"], dtype=torch.float32)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.2f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")


def strict_json(data: Any, **kwargs: Any) -> str:
    """JSON that strict parsers accept: NaN and inf (which json.dumps writes as bare NaN/Infinity) become null."""
    return json.dumps(_finite_or_null(data), allow_nan=False, **kwargs)


def _finite_or_null(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite_or_null(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_or_null(value) for value in data]
    return data


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so that readers see the old file or the new one, never a partial one."""
    atomic_io.write_text_atomic(path, strict_json(data, indent=2) + "\n")


class MetricsLog:
    """Append-only JSON lines, one record per optimizer step.

    A fresh run starts the file over. A resumed run keeps the records up to the step it resumes from and
    drops later ones (written by the interrupted run after its last checkpoint), so the file stays one
    record per step.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        # atomic: a crash while trimming must not lose the records of the steps before the resumed one
        atomic_io.write_text_atomic(self.path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(strict_json(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class RunTotals:
    """Running totals of the steps this process trained, for the summary."""

    def __init__(self) -> None:
        self.steps = 0
        self.final_loss: float | None = None
        self.timed_tokens = 0
        self.timed_s = 0.0
        self._keep_sum: list[float] | None = None

    def add(self, loss: float, keep_per_layer: list[float], tokens: int, seconds: float, timed: bool) -> None:
        """One step; ``timed`` False leaves it out of the throughput (a process's first, warm-up step)."""
        self.steps += 1
        self.final_loss = loss
        if timed:
            self.timed_tokens += tokens
            self.timed_s += seconds
        if self._keep_sum is None:
            self._keep_sum = list(keep_per_layer)
        else:
            self._keep_sum = [a + b for a, b in zip(self._keep_sum, keep_per_layer, strict=True)]

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.timed_s if self.timed_s else 0.0

    @property
    def keep_ratio_per_layer(self) -> list[float] | None:
        return [k / self.steps for k in self._keep_sum] if self._keep_sum else None

    @property
    def mean_keep_ratio(self) -> float | None:
        per_layer = self.keep_ratio_per_layer
        return sum(per_layer) / len(per_layer) if per_layer else None
