"""launch/train_predictor.py, and predictors inside launch/train.py: the file, a file for another model, the
calibration path (no file: predictors trained on the first micro-batches, then online refresh while training), and
the predictors in every checkpoint, restored on resume (on the same number of ranks, and on another)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch_util import JOB_ENV, REPO, TRAIN, load_launch_script, ok, run_deepspeed, summary, train_single
from safetensors.torch import load_file
from test_train_launch import _back_to, metrics

from lemo_ds.config import parse_lemo_config
from lemo_ds.predictors import read_metadata
from lemo_ds.predictors.scorer import CHECKPOINT_BANK, CHECKPOINT_STATE
from lemo_ds.scorers import build_scorer
from lemo_ds.training.presets import preset_config

FAST = ("--seq-len", "256")


@pytest.fixture(scope="module")
def mistral_predictors(tmp_path_factory):
    """Predictors trained by launch/train_predictor.py for the tiny-mistral preset, and what it printed."""
    out = tmp_path_factory.mktemp("predictors") / "mistral.safetensors"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = load_launch_script("train_predictor").main(
            ["--model", "tiny-mistral", *FAST, "--batches", "3", "--eval-batches", "1", "--out", str(out)]
        )
    assert status == 0, printed.getvalue()
    return out, printed.getvalue()


def test_train_predictor_writes_the_file_and_prints_the_recall_table(mistral_predictors):
    path, printed = mistral_predictors
    assert "| layer | keep | recall | recall after pruning | positional prior |" in printed
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["4", "5", "6", "7", "mean"]  # the sparse layers of the 8-layer preset (first_half dense)
    meta = read_metadata(path)
    assert meta["fingerprint"] == {"model_type": "mistral", "num_hidden_layers": 8, "hidden_size": 256,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "block_size": 64}  # fmt: skip
    assert set(meta["layers"]) == {"4", "5", "6", "7"}
    assert set(meta["info"]["recall"]) == {"4", "5", "6", "7"} and meta["info"]["model"] == "tiny-mistral"
    assert all(0 < sizes["hidden_q"] <= 64 and 0 < sizes["hidden_k"] <= 64 for sizes in meta["layers"].values())


def test_train_job_rejects_predictors_of_another_model(mistral_predictors, tmp_path, monkeypatch, capsys):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    path, _ = mistral_predictors
    train = load_launch_script("train")
    status = train.main([*FAST, "--max-steps", "1", "--output-dir", str(tmp_path), "--predictor", str(path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lemo_ds: error: ")]
    assert status == 2 and len(errors) == 1  # (the default model is tiny-llama)
    assert "was trained for another model: model_type 'mistral' (file) vs 'llama' (model)" in errors[0]


def predictor_config(folder: Path, **changes) -> str:
    """zero3_lemo.json with the predictor scorer and no file: calibrated on 2 micro-batches, refreshed every step,
    two micro-batches per step (``changes``: top-level DeepSpeed keys). Each step's first micro-batch is selected by
    the oracle (the refresh), its second by the predictors. Blocks of 16 tokens: 16 to a row of 256, so that which
    blocks the predictors choose, and their recall, tell predictors apart (4 blocks of 64 hardly do)."""
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["lemo"].update(scorer="predictor", block_size=16, predictor={"calibration_batches": 2,
                          "calibration_updates": 20, "refresh_every": 1, "refresh_updates": 4, "lr": 0.05})  # fmt: skip
    config.update({"gradient_accumulation_steps": 2, **changes})
    path = folder / f"predictor{''.join(f'_{key}{value}' for key, value in changes.items())}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def predictor_run(tmp_path_factory) -> tuple[str, Path, str]:
    """Two ranks, ZeRO-3, the predictor scorer calibrated and refreshed, 4 steps with a checkpoint every 2: (its
    config, its folder, what it printed)."""
    root = tmp_path_factory.mktemp("predictor_4")
    config, out = predictor_config(root), root / "run"
    result = run_deepspeed(TRAIN, "--deepspeed", config, *FAST, "--max-steps", "4", "--save-every", "2",
                           "--output-dir", str(out), timeout=300, env=JOB_ENV)  # fmt: skip
    return config, out, ok(result).stdout


@pytest.mark.slow
def test_train_job_calibrates_predictors_then_trains_sparse_with_online_refresh(predictor_run):
    _, out, printed = predictor_run
    calibrated = [line for line in printed.splitlines() if "predictors: calibrated on 2 micro-batches" in line]
    assert len(calibrated) == 1 and "layer 4" in calibrated[0] and "layer 7" in calibrated[0], printed
    records = metrics(out)
    # engine.global_steps is 1, 2, 3 during train steps 2, 3, 4: the refreshes (refresh_every 1, never at 0).
    assert "predictor_recall" not in records[0]
    for record in records[1:]:
        assert 0.0 <= record["predictor_recall"] <= 1.0
        assert {f"predictor_recall_layer{i}" for i in (4, 5, 6, 7)} <= set(record)
    result_summary = summary(out)
    assert result_summary["scorer"] == "predictor" and result_summary["mean_keep_ratio"] < 1.0
    assert result_summary["world_size"] == 2


@pytest.mark.slow
def test_checkpoints_hold_the_predictors_as_a_predictors_file(predictor_run):
    """Every checkpoint holds the predictor scorer's state, under its completion marker's checksums; its bank is a
    predictors file that another job reads with --predictor (lemo.predictor_path)."""
    config, out, _ = predictor_run
    for tag in ("step2", "step4"):
        manifest = json.loads((out / "checkpoints" / tag / "lemo_ds_complete.json").read_text())["files"]
        assert {CHECKPOINT_BANK, CHECKPOINT_STATE} <= set(manifest)
    path = out / "checkpoints" / "step4" / CHECKPOINT_BANK
    meta = read_metadata(path)
    assert meta["fingerprint"]["model_type"] == "llama" and meta["fingerprint"]["block_size"] == 16
    assert set(meta["layers"]) == {"4", "5", "6", "7"} and meta["info"] == {"checkpoint_step": 4}
    section = json.loads(Path(config).read_text())["lemo"]
    scorer = build_scorer(parse_lemo_config({**section, "predictor_path": str(path)}))  # as --predictor FILE makes it
    scorer.bind(preset_config("tiny-llama"))  # the fingerprint and the sparse layers fit the job's model
    assert scorer.all_trained


def refresh_recall(record: dict) -> dict[str, float]:
    return {key: value for key, value in record.items() if key.startswith("predictor_recall")}


@pytest.mark.slow
def test_interrupted_predictor_job_resumes_with_the_same_selections(predictor_run, tmp_path):
    """The run as a job lost after its step-2 checkpoint left it, resumed on two ranks: the predictors (weights,
    Adam state, observations, refresh schedule) come back from the checkpoint instead of being calibrated again on
    the rows after it, so steps 3 and 4 select, lose and refresh as the uninterrupted run did."""
    config, reference, _ = predictor_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _back_to(out, 2)
    result = run_deepspeed(TRAIN, "--deepspeed", config, *FAST, "--max-steps", "4", "--save-every", "2", "--resume",
                           "--output-dir", str(out), timeout=300, env=JOB_ENV)  # fmt: skip
    printed = ok(result).stdout
    tag = out / "checkpoints" / "step2"
    restored = f"lemo_ds: predictors restored from {tag / CHECKPOINT_BANK} (layers [4, 5, 6, 7]), not calibrated again"
    mine, theirs = metrics(out), metrics(reference)
    assert [record["step"] for record in mine] == [1, 2, 3, 4]
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (mine, theirs)
        assert a["keep_ratio_per_layer"] == pytest.approx(b["keep_ratio_per_layer"], rel=1e-6), (mine, theirs)
        assert refresh_recall(a) == pytest.approx(refresh_recall(b), rel=1e-6), (mine, theirs)
    assert all(refresh_recall(record) for record in mine[1:])
    # The predictors the two runs ended with: the same, to rounding.
    ends = [load_file(run / "checkpoints" / "step4" / CHECKPOINT_BANK) for run in (out, reference)]
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-5, atol=1e-6)
    assert restored in printed.splitlines() and "predictors: calibrated" not in printed, printed


@pytest.mark.slow
def test_two_rank_predictor_checkpoint_resumes_on_one_rank(predictor_run, tmp_path):
    """The two ranks' step-2 checkpoint resumed on one (DeepSpeed's universal checkpoint, 4 accumulation steps): the
    predictors come back from the tag's own folder and go on training from there (their observations continue)."""
    _, reference, _ = predictor_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _back_to(out, 2)
    gas4 = predictor_config(tmp_path, gradient_accumulation_steps=4)  # the same 4 rows a step
    printed = ok(train_single("--deepspeed", gas4, *FAST, "--max-steps", "3", "--resume", "--output-dir", str(out),
                              env=JOB_ENV)).stdout  # fmt: skip
    tag = out / "checkpoints" / "step2"
    assert "saved by 2 ranks, on 1 through DeepSpeed's universal checkpoint" in printed, printed
    restored = f"lemo_ds: predictors restored from {tag / CHECKPOINT_BANK} (layers [4, 5, 6, 7]), not calibrated again"
    assert restored in printed.splitlines() and "predictors: calibrated" not in printed, printed

    def observations(tag_dir: Path) -> dict[int, list[dict]]:
        return torch.load(tag_dir / CHECKPOINT_STATE, weights_only=True)["trainer"]["history"]

    # Two calibration batches and the refresh of train step 2 (global step 1), then step 3's: no second calibration.
    before, after = observations(tag), observations(out / "checkpoints" / "step3")
    assert {layer: len(history) for layer, history in before.items()} == {4: 3, 5: 3, 6: 3, 7: 3}
    assert {layer: history[:3] for layer, history in after.items()} == before
    assert {layer: len(history) for layer, history in after.items()} == {4: 4, 5: 4, 6: 4, 7: 4}
    assert "predictor_recall" in metrics(out)[2]
