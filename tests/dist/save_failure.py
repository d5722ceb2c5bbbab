"""Two ranks, one real ZeRO-3 engine: a checkpoint save that fails on one rank only stops every rank with the same
message naming that rank and the cause, and no rank is left waiting in a collective (run by
tests/test_resume_collective.py). Also --overwrite's clearing of an earlier run: every rank sees the folder clear.

Each scenario writes its outcome into this rank's report; the last failure is left to stop the script the way
launch/train.py stops (one line, exit status 3).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

import deepspeed
import torch
from _engine import build, ds_config, lemo_engine, write_report

from lemo_ds.training import checkpoint_files, output_dir, resume
from lemo_ds.training.errors import TrainingStopped

SETTINGS = {"seq_len": 64, "seed": 0, "data": None, "model": "tiny", "lora_r": 0}


class Job:  # the settings a checkpoint records (lemo_ds.training.job.Job has them too)
    resume = False
    locals().update(SETTINGS)


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # set by the launcher
    out = parser.parse_args().out
    ckpt_dir = out / output_dir.CHECKPOINTS
    report = {"rank": rank}

    # --overwrite: an earlier run's files, cleared by rank 0 while rank 1 waits.
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("{}\n")
        (ckpt_dir / "step9").mkdir()
    torch.distributed.barrier()
    output_dir.start_over(out)
    report["cleared"] = output_dir.earlier_run(out) == []

    engine = lemo_engine(build(seed=0), ds_config(zero_stage=3))

    def stopped(step: int) -> str | None:
        try:
            resume.save(engine, ckpt_dir, step, step, Job, keep=0)
        except TrainingStopped as error:
            return str(error)
        return None

    # 1. Inside DeepSpeed's save_checkpoint, on rank 1 only: an I/O error writing its partition.
    real_save = engine.checkpoint_engine.save
    if rank == 1:

        def failing_save(state_dict, path):
            raise OSError(errno.EIO, "injected I/O error", path)

        engine.checkpoint_engine.save = failing_save
    report["inside"] = stopped(1)
    engine.checkpoint_engine.save = real_save

    # 2. A good save right after: the ranks are still in step with each other.
    report["good"] = stopped(2)
    report["latest"] = (ckpt_dir / resume.LATEST).read_text()

    # 3. Making the tag's folder, on rank 0 only: permission denied (inside save_checkpoint, rank 0 alone makes it
    # before a barrier the other ranks would wait at).
    real_mkdir = Path.mkdir
    if rank == 0:

        def refused_mkdir(path, *args, **kwargs):
            if path.name == "step4":
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        Path.mkdir = refused_mkdir
    report["folder"] = stopped(4)
    Path.mkdir = real_mkdir

    # 4. Hashing the files, on rank 0 only: the disk is full. Left to stop the script, as launch/train.py stops.
    if rank == 0:

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_dir / "step3" / "x.pt"))

        checkpoint_files.manifest_share = full_disk
    try:
        resume.save(engine, ckpt_dir, 3, 3, Job, keep=0)
    except TrainingStopped as error:
        report["manifest"] = str(error)
        write_report(report)
        print(f"lemo_ds: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    finally:
        torch.distributed.destroy_process_group()
    write_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
