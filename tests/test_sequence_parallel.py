"""Ulysses sequence parallelism with per-rank token elimination (lemo_ds.sequence_parallel), on two CPU ranks
(one SP group) or four (2 data-parallel x 2 sequence-parallel) over gloo with real DeepSpeed engines (ZeRO-3).
See tests/dist/sp_equivalence.py for what each run compares."""

from __future__ import annotations

import json

import pytest
from launch_util import REPO, run_deepspeed, run_for_reports

from lemo_ds.core.selection import shard_forced_blocks
from lemo_ds.errors import LemoConfigError
from lemo_ds.sequence_parallel import check_dims, check_zero_config

ENV = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dense", "plain"])
def test_sp2_with_every_keep_ratio_one_equals_sp1(mode):
    """SP=2 with every keep ratio 1.0 ("dense": lemo_ds's segment loss; "plain": no lemo section, Hugging Face's
    loss) equals the plain single-process model on the whole row: loss and every gradient."""
    for report in run_for_reports(REPO / "tests/dist/sp_equivalence.py", "--mode", mode, env=ENV, timeout=600):
        assert report["ok"], report
        assert report["keep_ratio_per_layer"] == ([1.0] * 4 if mode == "dense" else None)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("checkpointing", "zero_stage", "eliminate"),
                         [(False, 3, "layer"), pytest.param(True, 3, "layer", marks=SLOW),
                          pytest.param(False, 2, "layer", marks=SLOW), pytest.param(True, 3, "attention", marks=SLOW)])
def test_sp2_elimination_equals_single_rank_per_shard_reference(checkpointing, zero_stage, eliminate):
    """SP=2 with elimination (oracle, keep 0.5) equals an independent masked single-process model that applies
    the per-shard selection rule, with and without activation checkpointing, under ZeRO-3 and ZeRO-2 (whose
    gradient reductions scale SP gradients differently)."""
    args = ["--mode", "sparse", "--zero-stage", str(zero_stage), "--eliminate", eliminate]
    args += ["--checkpointing"] if checkpointing else []
    for report in run_for_reports(REPO / "tests/dist/sp_equivalence.py", *args, env=ENV, timeout=600):
        assert report["ok"], report
        assert report["keep_ratio_per_layer"][0] == 1.0 and max(report["keep_ratio_per_layer"][1:]) == 0.5


@pytest.mark.slow
def test_two_data_parallel_groups_of_sp2_equal_the_mean_over_their_rows():
    """4 ranks = 2 data-parallel x 2 sequence-parallel (ZeRO-3 over all four): each SP group trains its own row;
    each group's loss equals the single-process reference on its row (the per-shard masked reference), and every
    full gradient equals the reference's gradient of the mean of the two rows' losses. Each rank also gets its SP
    half of the right row at the first two micro-steps. Sparse only: the data-parallel x sequence-parallel machinery
    (groups, rows, the mean) is the same for the plain model ("dense", about 80 s of CI's four ranks on two cores),
    whose SP=2 forward and backward test_sp2_with_every_keep_ratio_one_equals_sp1 covers."""
    reports = run_for_reports(
        REPO / "tests/dist/sp_equivalence.py", "--mode", "sparse", "--dp", "2", ranks=4, env=ENV, timeout=600
    )
    # The two rows must give different losses, or training one row everywhere would pass the loss check too.
    first, second = reports[0]["reference_losses"]
    assert abs(first - second) > 1e-3, reports[0]
    for report in reports:
        assert report["ok"], report
        assert (report["dp_rank"], report["sp_rank"]) == divmod(report["rank"], 2), report
        assert report["loss"] == pytest.approx((first, second)[report["dp_rank"]], abs=1e-5), report
        keep = report["keep_ratio_per_layer"]
        assert keep[0] == 1.0 and max(keep[1:]) == 0.5, report


@pytest.mark.parametrize(
    ("seq_len", "message"),
    [
        (101, "does not divide by sequence_parallel_size 2"),
        (192, "multiple of sequence_parallel_size x block_size = 128"),
    ],
)
def test_bad_sequence_length_is_a_clear_error(seq_len, message):
    with pytest.raises(LemoConfigError, match=message):
        check_dims(sp=2, world_size=2, seq_len=seq_len, block_size=64, heads=4, kv_heads=2)
    # dense: the shards need not be whole blocks
    check_dims(sp=2, world_size=2, seq_len=192, block_size=None, heads=4, kv_heads=2)


def test_parallel_dims_are_checked():
    with pytest.raises(LemoConfigError, match="does not divide the world size 3"):
        check_dims(sp=2, world_size=3, seq_len=256, block_size=64, heads=4, kv_heads=2)
    with pytest.raises(LemoConfigError, match="attention heads"):
        check_dims(sp=4, world_size=4, seq_len=512, block_size=64, heads=6, kv_heads=2)
    check_dims(sp=4, world_size=8, seq_len=512, block_size=64, heads=32, kv_heads=8)  # 2 data x 4 sequence
    with pytest.raises(LemoConfigError, match="reduce_scatter"):
        check_zero_config({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 2)


def test_forced_blocks_are_global_and_counts_are_equal():
    # 2 shards of 4 blocks; always keep global blocks 0 and -1 (= 7): one in each shard
    assert shard_forced_blocks(4, 2, 0, [0, -1]) == ([0], 1)
    assert shard_forced_blocks(4, 2, 1, [0, -1]) == ([3], 1)
    # only block 0: the second shard forces nothing but still counts one toward k
    assert shard_forced_blocks(4, 2, 1, [0]) == ([], 1)
    assert shard_forced_blocks(4, 2, 0, [0, 1, 9]) == ([0, 1], 2)  # 9 is past the sequence: ignored


@pytest.mark.slow
def test_train_launch_with_sequence_parallelism(tmp_path):
    """launch/train.py with ds_configs/zero3_lemo_sp.json on two ranks (one SP group of 2): trains, eliminates
    per shard, and reports the SP layout."""
    out = tmp_path / "run"
    result = run_deepspeed(
        REPO / "launch/train.py", "--deepspeed", str(REPO / "ds_configs/zero3_lemo_sp.json"), "--max-steps", "2",
        "--seq-len", "256", "--output-dir", str(out), "--no-save", env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequence_parallel_size"] == 2 and summary["world_size"] == 2
    # 128 tokens per shard = 2 blocks; round(0.4 x 2) = 1 block kept per shard in the sparse layers 4..6
    assert summary["keep_ratio_per_layer"] == [1.0] * 4 + [0.5] * 3 + [1.0]
    assert summary["final_loss"] is not None and summary["final_loss"] > 0


def test_train_launch_rejects_a_length_that_does_not_shard_into_blocks(tmp_path):
    result = run_deepspeed(
        REPO / "launch/train.py", "--deepspeed", str(REPO / "ds_configs/zero3_lemo_sp.json"), "--max-steps", "1",
        "--seq-len", "192", "--output-dir", str(tmp_path / "run"), env=ENV,
    )  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("lemo_ds: error:")]
    assert len(errors) == 2, result.stderr[-3000:]  # every rank, before any collective
    assert "multiple of sequence_parallel_size x block_size = 128" in errors[0]


def test_the_default_processed_loss_is_refused_under_sequence_parallelism_before_any_engine():
    """The "lemo" section's default loss (processed positions) would be a mean of per-shard means under Ulysses:
    lemo_ds.initialize refuses it, naming the key and the fix, before DeepSpeed or a process group is touched."""
    from tiny_models import tiny_model

    import lemo_ds

    config = {"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": 2, "lemo": {"keep_ratio": 0.5}}
    with pytest.raises(LemoConfigError, match=r'loss_tokens "processed" \(the default\).*"loss_tokens": "all"'):
        lemo_ds.initialize(model=tiny_model("llama"), config=config)
    config["lemo"]["loss_tokens"] = "processed"
    with pytest.raises(LemoConfigError, match=r'loss_tokens "processed" is not supported with sequence parallelism'):
        lemo_ds.initialize(model=tiny_model("llama"), config=config)
    with open(REPO / "ds_configs" / "zero3_lemo_sp.json") as handle:  # the shipped SP config sets LeMo's rule
        shipped = json.load(handle)
    assert lemo_ds.parse_lemo_config(shipped["lemo"]).loss_tokens == "all"
