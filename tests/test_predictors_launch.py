"""launch/train_predictor.py, and predictors inside launch/train.py: the file, a file for another model, and the
calibration path (no file: predictors trained on the first micro-batches, then online refresh while training)."""

from __future__ import annotations

import json

import pytest
from launch_util import JOB_ENV, REPO, load_launch_script, ok, summary, train_single
from test_train_launch import metrics

from lemo_ds.predictors import read_metadata

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
    assert rows[1:] == ["4", "5", "6", "mean"]  # the sparse layers of the 8-layer preset
    meta = read_metadata(path)
    assert meta["fingerprint"] == {"model_type": "mistral", "num_hidden_layers": 8, "hidden_size": 256,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "block_size": 64}  # fmt: skip
    assert set(meta["layers"]) == {"4", "5", "6"}
    assert set(meta["info"]["recall"]) == {"4", "5", "6"} and meta["info"]["model"] == "tiny-mistral"
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


@pytest.mark.slow
def test_train_job_calibrates_predictors_then_trains_sparse_with_online_refresh(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["lemo"].update(scorer="predictor", predictor={"calibration_batches": 2, "calibration_updates": 5,
                                                         "refresh_every": 1, "refresh_updates": 2})  # fmt: skip
    path = tmp_path / "predictor.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    result = train_single("--deepspeed", str(path), *FAST, "--max-steps", "3", "--no-save", "--output-dir", str(out),
                          env=JOB_ENV)  # fmt: skip
    ok(result)
    calibrated = [line for line in result.stdout.splitlines() if "predictors: calibrated on 2 micro-batches" in line]
    assert len(calibrated) == 1 and "layer 4" in calibrated[0] and "layer 6" in calibrated[0], result.stdout
    records = metrics(out)
    # engine.global_steps is 1 and 2 during train steps 2 and 3: the refreshes (refresh_every 1, never at 0).
    assert "predictor_recall" not in records[0]
    for record in records[1:]:
        assert 0.0 <= record["predictor_recall"] <= 1.0
        assert {f"predictor_recall_layer{i}" for i in (4, 5, 6)} <= set(record)
    result_summary = summary(out)
    assert result_summary["scorer"] == "predictor" and result_summary["mean_keep_ratio"] < 1.0
