"""benchmarks/sp.py on CPU (tiny shape, gloo): a measurement under two SP ranks and the max-context prober."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch_util import REPO, run_deepspeed

sys.path.insert(0, str(REPO))
from benchmarks import sp  # noqa: E402

ENV = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "LEMO_BENCH_GIT_COMMIT": "abc123"}


@pytest.mark.slow
def test_two_sp_ranks_measure_both_variants(tmp_path):
    result = run_deepspeed(
        REPO / "benchmarks/sp.py", "--sp", "2", "--seq", "256", "--shape", "tiny-llama", "--variant",
        "dense-stack,lemo-stack", "--steps", "1", "--warmup", "0", "--out", str(tmp_path), env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = tmp_path.glob("sp-dense-stack+lemo-stack-sp2-seq256-*.json")
    data = json.loads(path.read_text())
    assert data["status"] == "complete" and data["settings"]["sp"] == 2 and data["settings"]["tokens_per_gpu"] == 128
    assert data["command"] and "environment" in data
    dense, lemo = data["results"]
    assert dense["variant"] == "dense-stack" and lemo["variant"] == "lemo-stack"
    assert dense["mean_keep_ratio"] == 1.0 and lemo["mean_keep_ratio"] < 1.0
    for entry in (dense, lemo):
        assert not entry["oom"] and entry["tokens_per_s_per_gpu"] > 0 and entry["model_tflops_per_gpu"] > 0
        assert entry["peak_alloc_gib"] is None  # no CUDA: not measured
        assert 4.0 < entry["loss"] < 8.0  # random tokens of a 512-id vocabulary: about ln(512)


@pytest.mark.slow
def test_maxctx_probes_in_fresh_processes(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks/sp.py"), "--maxctx", "--sp", "1", "--seqs", "128",
               "--shape", "tiny-llama", "--variant", "lemo-stack", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **ENV}, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = tmp_path.glob("sp-maxctx-lemo-stack-sp1-*.json")
    data = json.loads(path.read_text())
    assert data["max_fit"] == 128 and data["probes"][0]["status"] == "fit" and data["status"] == "complete"


def test_a_probe_out_of_memory_is_a_failure_not_a_crash(tmp_path):
    (tmp_path / "log.txt").write_text("torch.OutOfMemoryError: CUDA out of memory")
    (tmp_path / "x-oom-rank1.json").write_text(json.dumps({"status": "oom", "results": [{"oom": True}]}))
    outcome = sp._probe_outcome({"seq": 4096, "folder": str(tmp_path), "slot": ["0", "1"], "command": ["x"]}, 3, 1.0)
    assert outcome["status"] == "oom" and not outcome["fits"]
    (tmp_path / "x-oom-rank1.json").unlink()
    (tmp_path / "log.txt").write_text("ValueError: something else")
    crashed = sp._probe_outcome({"seq": 1, "folder": str(tmp_path), "slot": [], "command": ["x"]}, 1, 1.0)
    assert crashed["status"] == "crash"
