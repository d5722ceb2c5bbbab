"""The training job's small modules, one process, no DeepSpeed launch: presets, precision, flags, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from lemo_ds.training import checkpointing, flags, metrics, precision, presets, resume, tracking
from lemo_ds.training.errors import TrainingSetupError
from lemo_ds.training.tokenizer import ByteTokenizer

# ---- presets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_presets_build_configs_that_fit_the_byte_tokenizer(name):
    config = presets.preset_config(name)
    assert config.vocab_size >= ByteTokenizer.vocab_size
    assert config.model_type in ("llama", "mistral", "qwen2")
    layers = presets.preset_config(name, num_hidden_layers=4)
    assert layers.num_hidden_layers == 4
    if getattr(layers, "layer_types", None) is not None:
        assert len(layers.layer_types) == 4  # derived fields follow the override


def test_real_shape_presets():
    llama2, llama3 = presets.preset_config("llama-2-7b"), presets.preset_config("llama-3-8b")
    assert (llama2.hidden_size, llama2.intermediate_size, llama2.num_hidden_layers, llama2.vocab_size) == (
        4096, 11008, 32, 32000)  # fmt: skip
    assert (llama3.num_key_value_heads, llama3.intermediate_size, llama3.vocab_size) == (8, 14336, 128256)
    assert llama3.rope_parameters["rope_theta"] == 500000.0


def test_tiny_preset_is_deep_enough_for_sparse_layers():
    config = presets.preset_config(presets.DEFAULT_PRESET)
    assert config.num_hidden_layers >= 4 and config.hidden_size <= 256


# ---- precision -----------------------------------------------------------------------------------------------


def test_bf16_auto_follows_the_hardware():
    config, dtype, note = precision.resolve_precision({"bf16": {"enabled": "auto"}}, "cpu")
    supported = precision.bf16_supported("cpu")
    assert config["bf16"]["enabled"] is supported
    assert dtype == (torch.bfloat16 if supported else torch.float32)
    assert "auto" in note


def test_precision_off_and_explicit():
    assert precision.resolve_precision({}, "cpu")[1] == torch.float32
    assert precision.resolve_precision({"bf16": {"enabled": False}}, "cpu")[1] == torch.float32
    config, dtype, _ = precision.resolve_precision({"bf16": {"enabled": True}}, "cpu")
    assert config["bf16"]["enabled"] is (dtype == torch.bfloat16)


def test_bf16_requested_on_a_cpu_without_bf16_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type: False)
    config, dtype, note = precision.resolve_precision({"bf16": {"enabled": True}}, "cpu")
    assert config["bf16"]["enabled"] is False and dtype == torch.float32 and "fp32" in note
    assert precision.resolve_precision({"bf16": {"enabled": "auto"}}, "cpu")[1] == torch.float32


# ---- flags ---------------------------------------------------------------------------------------------------


def test_lr_flag_sets_optimizer_and_warmup_peak():
    raw = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-4, "warmup_num_steps": 3}},
    }
    out = flags.apply_flag_overrides(raw, lr=5e-3, predictor=None, config_path="x.json")
    assert out["optimizer"]["params"]["lr"] == 5e-3 and out["scheduler"]["params"]["warmup_max_lr"] == 5e-3
    assert raw["optimizer"]["params"]["lr"] == 1e-4  # the input is left alone


def test_max_steps_fills_an_auto_decay_length():
    raw = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 3}}}
    out = flags.apply_flag_overrides(raw, lr=None, predictor=None, config_path="x.json", max_steps=1000)
    assert out["scheduler"]["params"]["total_num_steps"] == 1000
    fixed = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}}
    assert flags.apply_flag_overrides(fixed, lr=None, predictor=None, config_path="x", max_steps=9) == fixed
    with pytest.raises(TrainingSetupError, match='total_num_steps is "auto"'):
        flags.apply_flag_overrides(raw, lr=None, predictor=None, config_path="x.json")


def test_predictor_flag_sets_the_lemo_scorer(tmp_path):
    predictors = tmp_path / "predictors.pt"
    predictors.write_bytes(b"x")
    out = flags.apply_flag_overrides({"lemo": {"keep_ratio": 0.4}}, lr=None, predictor=str(predictors), config_path="c")
    assert out["lemo"] == {"keep_ratio": 0.4, "scorer": "predictor", "predictor_path": str(predictors)}
    with pytest.raises(TrainingSetupError, match='needs a "lemo" section'):
        flags.apply_flag_overrides({}, lr=None, predictor=str(predictors), config_path="dense.json")


@pytest.mark.parametrize("value", [None, 0, "auto", True])
def test_micro_batch_must_be_given(value):
    with pytest.raises(TrainingSetupError, match="train_micro_batch_size_per_gpu"):
        flags.micro_batch_size({"train_micro_batch_size_per_gpu": value})
    assert flags.micro_batch_size({"train_micro_batch_size_per_gpu": 2}) == 2


def test_an_optimizer_section_is_required():
    with pytest.raises(TrainingSetupError, match='no "optimizer" section'):
        flags.require_optimizer({"train_micro_batch_size_per_gpu": 1})
    flags.require_optimizer({"optimizer": {"type": "AdamW"}})


# ---- checkpointing, wandb, resume -----------------------------------------------------------------------------


def test_grad_ckpt_auto_follows_the_config():
    assert checkpointing.resolve_mode("auto", {"activation_checkpointing": {}}) == "deepspeed"
    assert checkpointing.resolve_mode("auto", {}) == "off"
    assert checkpointing.resolve_mode("hf", {}) == "hf"


def test_wandb_enabled_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(TrainingSetupError, match="pip install wandb"):
        tracking.prepare_wandb({"wandb": {"enabled": True}}, str(tmp_path))
    assert tracking.prepare_wandb({"wandb": {"enabled": False}}, str(tmp_path)) is False


def test_resume_needs_a_latest_checkpoint(tmp_path):
    with pytest.raises(TrainingSetupError, match="no checkpoint"):
        resume.require_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step7")
    with pytest.raises(TrainingSetupError, match="no checkpoint"):  # latest names a folder that is not there
        resume.require_checkpoint(tmp_path)
    (tmp_path / "step7").mkdir()
    with pytest.raises(TrainingSetupError, match="no complete checkpoint.*step7"):  # a save that never finished
        resume.require_checkpoint(tmp_path)
    (tmp_path / "step7" / resume.COMPLETE).write_text('{"step": 7}')
    resume.require_checkpoint(tmp_path)


# ---- metrics -------------------------------------------------------------------------------------------------


def test_metrics_log_restarts_or_keeps_steps_up_to_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    with path.open("a") as handle:
        handle.write('{"step": 6, "lo')  # a line cut short by a crash
    metrics.MetricsLog(path, resume_step=3)
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3]
    metrics.MetricsLog(path)
    assert path.read_text() == ""


def test_summary_is_written_atomically(tmp_path):
    path = tmp_path / "summary.json"
    metrics.write_json_atomic(path, {"a": 1})
    metrics.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_run_totals_leave_the_warmup_step_out_of_throughput():
    totals = metrics.RunTotals()
    totals.add(2.0, [1.0, 0.5], tokens=100, seconds=10.0, timed=False)
    totals.add(1.0, [1.0, 0.25], tokens=100, seconds=1.0, timed=True)
    assert totals.final_loss == 1.0 and totals.tokens_per_s == 100.0
    assert totals.keep_ratio_per_layer == [1.0, 0.375] and totals.mean_keep_ratio == pytest.approx(0.6875)


def test_peak_memory_on_cpu_is_the_peak_rss():
    peak, kind = metrics.peak_memory("cpu")
    assert kind == "host_max_rss" and peak > 10 * 2**20
    assert metrics.format_bytes(3 * 2**30) == "3.00GiB" and metrics.format_bytes(12) == "12B"
