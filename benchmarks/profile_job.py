"""Where a step of the main job goes: launch/train.py's own job under torch.profiler.

Same flags as launch/train.py (run it with ``deepspeed --num_gpus 1 benchmarks/profile_job.py --deepspeed CONFIG
...``). The job runs as launch/train.py runs it (describe, start, train); the profiler records steps
``--skip + 1`` to ``--skip + --active`` after the engine's optimizer step of each. Writes, under ``--profile-out``:

- ``ops-<tag>.txt``: the operators by self CUDA time and by self CPU time (top 40 each);
- ``profile-<tag>.json``: per profiled step, the wall time, the time kernels ran on the GPU and its share, and the
  CUDA allocator's peak and reserved memory.

A GPU busy far less than the wall time points at the host (Python hooks, synchronisations); the operator tables
say which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_train_module():
    spec = importlib.util.spec_from_file_location("lemo_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_profile(prof, walls: list[float], out: Path, tag: str, skip: int, active: int, argv: list[str]) -> dict:
    """Write ops-<tag>.txt and profile-<tag>.json of a finished profiler run (``walls``: every step's wall time) and
    return the record. benchmarks/hf_liger_job.py --profile-out writes the baseline's the same way."""
    cuda = torch.cuda.is_available()
    events = prof.key_averages()
    sort_cuda = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / f"ops-{tag}.txt").write_text(
        "by self CUDA time\n" + events.table(sort_by=sort_cuda, row_limit=40, max_name_column_width=80)
        + "\n\nby self CPU time\n" + events.table(sort_by="self_cpu_time_total", row_limit=40,
                                                   max_name_column_width=80)
    )  # fmt: skip
    kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    profiled = walls[skip : skip + active]
    record = {
        "tag": tag,
        "argv": argv,
        "step_walls_s": walls,
        "profiled_wall_s": sum(profiled),
        "gpu_kernel_s": kernel_us / 1e6,
        "gpu_busy_share": (kernel_us / 1e6) / sum(profiled) if profiled else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }
    (out / f"profile-{tag}.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--profile-out", default="outputs/profile")
    extra.add_argument("--profile-tag", default="job")
    extra.add_argument("--skip", type=int, default=2, help="steps before the profiled ones")
    extra.add_argument("--active", type=int, default=2, help="profiled steps")
    ours, rest = extra.parse_known_args(argv)
    train = load_train_module()
    args = train.parse_args(rest)
    out = Path(ours.profile_out)
    out.mkdir(parents=True, exist_ok=True)

    job = train.describe(args)
    rt = train.start(job)
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=ours.skip, warmup=0, active=ours.active, repeat=1)
    walls: list[float] = []
    marks = [time.perf_counter()]
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        original_step = rt.engine.step

        def step(*a, **k):
            result = original_step(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            walls.append(marks[-1] - marks[-2])
            prof.step()
            return result

        rt.engine.step = step
        train.train(job, rt)
    record = write_profile(prof, walls, out, ours.profile_tag, ours.skip, ours.active, rest)
    print(json.dumps(record))
    train.close(rt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
