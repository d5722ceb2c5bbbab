"""ZeRO-3 across two CPU ranks: lemo_ds.initialize on a model built under zero.Init trains exactly like a
plain single-process model with the same conversion (see tests/dist/zero3_equivalence.py)."""

from __future__ import annotations

import pytest
from launch_util import REPO, run_for_reports

SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "checkpointing", [False, pytest.param(True, marks=SLOW), "all-memory", pytest.param("attention", marks=SLOW)]
)
def test_zero3_two_ranks_match_single_process_reference(checkpointing):
    """``all-memory``: checkpointing with the fused ops (Triton RMSNorm/RoPE/SwiGLU, Liger's fused linear
    cross-entropy on the partitioned LM head) and every memory feature (segment loss, kept-rows checkpointing, tiled
    MLP, saved-tensor compaction, host offload of the stored inputs) against a reference with none of them.
    ``attention``: checkpointing with ``eliminate: "attention"`` (the MLP of every row, through ZeRO-3's hooks)."""
    args = ["--checkpointing"] if checkpointing else []
    args += ["--all-memory"] if checkpointing == "all-memory" else []
    args += ["--eliminate", "attention"] if checkpointing == "attention" else []  # with checkpointing
    reports = run_for_reports(REPO / "tests/dist/zero3_equivalence.py", *args, env={"DS_ACCELERATOR": "cpu"})
    for report in reports:
        assert report["ok"], report
        assert report["keep_ratio_per_layer"][0] == 1.0 and max(report["keep_ratio_per_layer"][1:]) < 0.6
