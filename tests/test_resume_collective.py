"""Checkpoint saves and --overwrite on two real ranks (CPU, gloo): a failure on one rank stops them all, with one
message naming the rank and the cause, and none hangs (see tests/dist/save_failure.py)."""

from __future__ import annotations

import json

from launch_util import REPO, REPORT_DIR_ENV, run_deepspeed


def test_a_save_failing_on_one_rank_stops_every_rank_naming_it(tmp_path):
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    out = tmp_path / "run"
    result = run_deepspeed(REPO / "tests" / "dist" / "save_failure.py", str(out), timeout=120,
                           env={REPORT_DIR_ENV: str(reports_dir), "OMP_NUM_THREADS": "1"})  # fmt: skip
    tail = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 3, tail  # TrainingStopped's exit status, not a hang (the timeout) nor a crash
    reports = [json.loads((reports_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    ckpt = out / "checkpoints"
    for report in reports:
        assert report["cleared"]  # --overwrite: every rank saw the earlier run gone
        # Inside save_checkpoint on rank 1: both ranks stop with the same line, naming rank 1 and the error.
        assert report["inside"] == reports[0]["inside"]
        assert report["inside"].startswith(f"saving checkpoint {ckpt / 'step1'} failed: OSError: [Errno 5] injected")
        # No complete checkpoint yet: the advice is to run again, not --resume (issue 32).
        assert report["inside"].endswith(
            "(rank 1); no complete checkpoint yet; fix that and run the same command again (it starts over from step 0)"
        )
        assert report["good"] is None and report["latest"] == "step2"
        # Making the folder fails on rank 0 alone: both stop before save_checkpoint, naming rank 0.
        assert report["folder"] == (
            f"saving checkpoint {ckpt / 'step4'} failed: PermissionError: [Errno 13] Permission denied: "
            f"'{ckpt / 'step4'}' (rank 0); 'latest' still names step2; fix that and continue with --resume"
        )
        # Hashing on rank 0 with a full disk: both stop, naming rank 0 and ENOSPC; 'latest' still names step2.
        assert report["manifest"] == (
            f"saving checkpoint {ckpt / 'step3'} failed: No space left on device (ENOSPC) on {ckpt / 'step3' / 'x.pt'} "
            "(rank 0); 'latest' still names step2; free space (or pass a smaller --keep-checkpoints) and continue "
            "with --resume"
        )
    assert (ckpt / "latest").read_text() == "step2"
    assert not (ckpt / "step1" / "lemo_ds_complete.json").exists()
    assert not (ckpt / "step3" / "lemo_ds_complete.json").exists()
    assert "Traceback" not in result.stderr
