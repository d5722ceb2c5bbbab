"""What every kernel benchmark in this folder shares: the checkout root, the kernels module, git facts, the
environment record, the timing of one call and the JSON file.

The scripts run as ``python benchmarks/kernels/bench_<op>.py`` (this folder is then first on sys.path)."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
QUANTILES = [0.5, 0.2, 0.8]  # do_bench's median, 20th and 80th percentiles, in the order it returns them


def import_kernels():
    """lemo_ds.kernels when installed; else kernels/ of this checkout, loaded as a package on its own (its imports
    are relative), so the benchmarks also run where lemo_ds's own dependencies (DeepSpeed, ...) are missing."""
    try:
        return importlib.import_module("lemo_ds.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "lemo_kernels_checkout",
            REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def git(*args: str) -> str | None:
    """Output of ``git ARGS`` in the checkout, or None without git or outside a repository."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(kernels, capability: bool = False, fields: Sequence[str] | None = None) -> dict:
    """Where and with what the benchmark ran (GPU 0, versions, git commit, exact command). ``capability`` adds
    the GPU's compute capability; ``fields`` keeps only those keys, in that order (a bench's shorter record)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    env = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
    }
    if capability:
        env["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    env.update(
        {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton.__version__,
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join([sys.executable, *sys.argv]),
            "cwd": os.getcwd(),
            "kernels_module": kernels.__file__,
            "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    return env if fields is None else {key: env[key] for key in fields}


def measure(fn, warmup: int, rep: int, grad_to_none=None, host_calls: int = 50, brief: bool = False) -> dict:
    """do_bench quantiles (ms); the host (CPU) time of one call, launches only, no sync: where it exceeds the GPU
    time the op is launch-bound in isolation (in a training step the CPU runs ahead and hides it); then the peak
    memory of one more call above what was allocated before it. ``grad_to_none``: tensors whose .grad is reset
    between calls. ``brief``: the quantiles and the peak above the inputs only, no host timing."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=QUANTILES)
    record = {"ms_median": median, "ms_p20": p20, "ms_p80": p80}
    if not brief:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(host_calls):
            fn()
            for t in grad_to_none or []:
                t.grad = None
        record["host_us_per_call"] = (time.perf_counter() - start) / host_calls * 1e6
        for t in grad_to_none or []:
            t.grad = None
    torch.cuda.synchronize()
    if not brief:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in grad_to_none or []:
        t.grad = None
    if not brief:
        record["peak_alloc_mib"] = peak / 2**20
    record["peak_above_inputs_mib"] = (peak - before) / 2**20
    return record


def write_json(path_arg: str, payload: dict, op: str) -> Path:
    """Write ``payload`` to ``path_arg``: a .json file, or a directory to write kernels_<op>.json into."""
    path = Path(path_arg)
    if path.suffix != ".json":  # a directory
        path = path / f"kernels_{op}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
