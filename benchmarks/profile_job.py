"""Where a step of the main job goes: launch/train.py's own job under torch.profiler.

Same flags as launch/train.py (run it with ``deepspeed --num_gpus 1 benchmarks/profile_job.py --deepspeed CONFIG
...``). The job runs as launch/train.py runs it (describe, start, train: lemo_ds.training); the profiler records steps
``--skip + 1`` to ``--skip + --active`` after the engine's optimizer step of each. Writes, under ``--profile-out``:

- ``ops-<tag>.txt``: the operators by self CUDA time and by self CPU time (top 40 each);
- ``profile-<tag>.json``: per profiled step, the wall time, the time kernels ran on the GPU and its share, and the
  CUDA allocator's peak and reserved memory.

A GPU busy far less than the wall time points at the host (Python hooks, synchronisations); the operator tables
say which.

``--memory-peak`` (CUDA) records the CUDA allocator's trace over step ``--skip + 1`` instead and writes
``memory-peak-<tag>.json``: that step's peak and the allocations alive at it, grouped by the code that made them
(benchmarks/memory_peak.py's replay, here on the main job's own path rather than the harness's), also printed as a
Markdown table.

``--calibration`` profiles the predictors' calibration before training instead (scorer "predictor"): the same two
files under the tag ``<tag>-calibration``, plus ``phases-<tag>-calibration.json``: the wall time of the oracle labels
and of the predictor updates (each timed between two device synchronisations), the rest being the frozen model's
forward.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def start_job(args: argparse.Namespace, stack: contextlib.ExitStack):
    """(job, runtime) as launch/train.py's run() makes them, DeepSpeed's output routed as there while ``stack``
    lives."""
    from lemo_ds.training import ds_output, launch_env
    from lemo_ds.training.job import describe
    from lemo_ds.training.runtime import start

    launch_env.default_single_process_env()
    deepspeed_output = stack.enter_context(ds_output.routed(args.verbose))
    job = describe(args)
    return job, start(job, deepspeed_output)


def parse_job_args(argv: list[str]) -> argparse.Namespace:
    """launch/train.py's own flags (its parse_args); loading the script also imports lemo_ds from its checkout."""
    spec = importlib.util.spec_from_file_location("lemo_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.parse_args(argv)


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
    extra.add_argument("--calibration", action="store_true", help="profile the predictors' calibration, not steps")
    extra.add_argument("--memory-peak", action="store_true",
                       help="what is alive at step --skip + 1's peak of device memory, not a time profile (CUDA)")
    # three frames named only the autograd engine for the largest group at 256K (results/memory-peak-20261207)
    extra.add_argument("--depth", type=int, default=6, help="--memory-peak: frames per group")
    extra.add_argument("--top", type=int, default=30, help="--memory-peak: groups listed")
    ours, rest = extra.parse_known_args(argv)
    if ours.calibration:
        return profile_calibration(ours, rest)
    if ours.memory_peak:
        if not torch.cuda.is_available():
            raise SystemExit("profile_job.py --memory-peak needs CUDA: it reads the CUDA caching allocator's trace")
        if ours.skip < 1:
            raise SystemExit("profile_job.py --memory-peak: --skip must be at least 1 (a first step makes the buffers)")
    args = parse_job_args(rest)
    out = Path(ours.profile_out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if ours.memory_peak:
            return memory_peak_step(args, ours, rest, out, stack)
        return profile_steps(args, ours, rest, out, stack)


def memory_peak_step(args: argparse.Namespace, ours: argparse.Namespace, rest: list[str], out: Path, stack) -> int:
    """Record the allocator's trace from the end of step ``skip`` to the end of step ``skip + 1`` (forward, loss,
    backward, optimizer step), replay it and write what was alive at its peak."""
    from benchmarks.memory_peak import StepTrace, markdown
    from lemo_ds.training.loop import train
    from lemo_ds.training.runtime import close

    if args.max_steps < ours.skip + 1:
        raise SystemExit(f"profile_job.py --memory-peak: --max-steps {args.max_steps} ends before the recorded step "
                         f"{ours.skip + 1}; give --max-steps {ours.skip + 1} or more")  # fmt: skip
    job, rt = start_job(args, stack)
    trace = StepTrace(torch.device("cuda", torch.cuda.current_device()))
    state = {"steps": 0}
    original_step = rt.engine.step

    def step(*a, **k):
        result = original_step(*a, **k)
        state["steps"] += 1
        if state["steps"] == ours.skip:
            trace.start()
        elif state["steps"] == ours.skip + 1:
            state["record"] = trace.stop(ours.depth, ours.top)
        return result

    rt.engine.step = step
    train(job, rt)
    record = {"tag": ours.profile_tag, "argv": rest, "recorded_step": ours.skip + 1, **state["record"]}
    (out / f"memory-peak-{ours.profile_tag}.json").write_text(json.dumps(record, indent=1))
    print(markdown(record, f"### {ours.profile_tag}, step {record['recorded_step']}"))
    close(rt)
    return 0


def profile_steps(args: argparse.Namespace, ours: argparse.Namespace, rest: list[str], out: Path, stack) -> int:
    from lemo_ds.training.loop import train
    from lemo_ds.training.runtime import close

    job, rt = start_job(args, stack)
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
        train(job, rt)
    record = write_profile(prof, walls, out, ours.profile_tag, ours.skip, ours.active, rest)
    print(json.dumps(record))
    close(rt)
    return 0


def _timed(phases: dict[str, float], name: str, fn):
    """``fn`` wrapped to add its wall time (between device synchronisations) to ``phases[name]``."""

    def wrapped(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.profiler.record_function(name):
            result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phases[name] += time.perf_counter() - started
        return result

    return wrapped


def profile_calibration(ours: argparse.Namespace, rest: list[str]) -> int:
    """Run the job's start (which calibrates the predictors) under the profiler; no training steps."""
    from lemo_ds.predictors import job as predictor_job
    from lemo_ds.predictors import scorer as predictor_scorer
    from lemo_ds.predictors import trainer as predictor_trainer
    from lemo_ds.training.runtime import close

    args = parse_job_args(rest)
    out = Path(ours.profile_out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{ours.profile_tag}-calibration"
    phases = {"oracle labels": 0.0, "predictor updates": 0.0, "calibration": 0.0}
    predictor_scorer.oracle_labels = _timed(phases, "oracle labels", predictor_scorer.oracle_labels)
    trainer = predictor_trainer.PredictorTrainer
    trainer.observe = _timed(phases, "predictor updates", trainer.observe)
    predictor_job.calibrate = _timed(phases, "calibration", predictor_job.calibrate)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            job, rt = start_job(args, stack)
        wall = time.perf_counter() - started
        close(rt)
    record = write_profile(prof, [phases["calibration"]], out, tag, 0, 1, rest)
    phases["model forward and the rest"] = phases["calibration"] - phases["oracle labels"] - phases["predictor updates"]
    (out / f"phases-{tag}.json").write_text(json.dumps({"start_wall_s": wall, "phases_s": phases}, indent=1))
    print(json.dumps({**record, "phases_s": phases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
