"""ZeRO-3 across two CPU ranks: lemo_ds.initialize on a model built under zero.Init trains exactly like a
plain single-process model with the same conversion (see tests/dist/zero3_equivalence.py)."""

from __future__ import annotations

import json

import pytest
from launch_util import REPO, run_deepspeed


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True, "all-memory"])
def test_zero3_two_ranks_match_single_process_reference(checkpointing):
    """``all-memory``: checkpointing with every memory feature (segment loss, kept-rows checkpointing, tiled MLP,
    saved-tensor compaction, host offload of the stored inputs) against a reference with none of them."""
    args = ["--checkpointing"] if checkpointing else []
    args += ["--all-memory"] if checkpointing == "all-memory" else []
    result = run_deepspeed(REPO / "tests/dist/zero3_equivalence.py", *args, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["ok"], report
        assert report["keep_ratio_per_layer"][0] == 1.0 and max(report["keep_ratio_per_layer"][1:]) < 0.6
