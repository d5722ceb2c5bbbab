"""The training job's small modules, one process, no DeepSpeed launch: presets, precision, flags, metrics."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from launch_util import load_launch_script

import lemo_ds
from lemo_ds.ds_auto import fill_auto
from lemo_ds.training import (
    checkpoint_files,
    checkpointing,
    finite,
    flags,
    metrics,
    output_dir,
    precision,
    presets,
    resume,
    retention,
    sparsity,
    text_check,
    tracking,
)
from lemo_ds.training.errors import TrainingSetupError, TrainingStopped
from lemo_ds.training.job import describe
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


def test_without_bf16_turns_off_either_key_and_leaves_the_input():
    given = {"bf16": {"enabled": True, "immediate_grad_update": True}, "train_micro_batch_size_per_gpu": 1}
    assert precision.without_bf16(given) == {"bf16": {"enabled": False, "immediate_grad_update": True},
                                             "train_micro_batch_size_per_gpu": 1}  # fmt: skip
    assert given["bf16"]["enabled"] is True
    assert precision.without_bf16({"bfloat16": {"enabled": True}}) == {"bfloat16": {"enabled": False}}
    assert precision.without_bf16({}) == {}


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


def test_auto_values_get_the_jobs_defaults_and_numbers_stay():
    """The shipped configs say "auto" for the Trainer (issue 32); plain DeepSpeed needs numbers: the ones the configs
    held before. --lr sets the optimizer's rate and the warm-up peak, "auto" or not."""
    shipped = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero3_lemo.json").read_text())
    filled = flags.apply_flag_overrides(shipped, lr=None, predictor=None, config_path="zero3_lemo.json")
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (1, 1)
    assert filled["gradient_clipping"] == 1.0 and filled["lemo"] == shipped["lemo"]
    assert filled["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                             "torch_adam": True}  # fmt: skip
    assert filled["scheduler"]["params"] == {"warmup_min_lr": 2e-5, "warmup_max_lr": 2e-4, "warmup_num_steps": 5,
                                             "warmup_type": "linear"}  # fmt: skip
    low = flags.apply_flag_overrides(shipped, lr=1e-5, predictor=None, config_path="zero3_lemo.json")
    assert low["optimizer"]["params"]["lr"] == low["scheduler"]["params"]["warmup_max_lr"] == 1e-5
    assert low["scheduler"]["params"]["warmup_min_lr"] == 1e-5  # never above the peak
    written = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto", "optimizer": {"params": {"lr": 3e-4}}}
    assert fill_auto(written) == {"train_micro_batch_size_per_gpu": 4, "optimizer": {"params": {"lr": 3e-4}}}


def test_lr_is_refused_where_the_scheduler_sets_the_rate_itself():
    raw = {"optimizer": {"params": {"lr": 1e-3}}, "scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}}
    with pytest.raises(TrainingSetupError, match=r"--lr 0\.0001: the OneCycle scheduler of c\.json sets the learning"):
        flags.apply_flag_overrides(raw, lr=1e-4, predictor=None, config_path="c.json")
    assert flags.apply_flag_overrides(raw, lr=None, predictor=None, config_path="c.json") == raw


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "fast"])
def test_a_learning_rate_flag_must_be_a_positive_number(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}' is not a learning rate"):
        flags.learning_rate(text)
    assert flags.learning_rate("2e-4") == 2e-4
    with pytest.raises(TrainingSetupError, match=r"optimizer\.params\.lr is -0\.1; it must be a positive number"):
        flags.require_optimizer({"optimizer": {"params": {"lr": -0.1}}})


def test_a_too_short_sequence_is_found_before_training():
    section = lemo_ds.parse_lemo_config({"keep_ratio": 0.4, "block_size": 64})
    assert "use --seq-len 128 or more" in sparsity.too_short_warning(section, 100, num_layers=8)
    assert sparsity.too_short_warning(section, 128, num_layers=8) is None  # 2 blocks: keeps 1
    assert sparsity.too_short_warning(lemo_ds.parse_lemo_config({"keep_ratio": 1.0}), 100, num_layers=8) is None
    over_shards = sparsity.too_short_warning(section, 256, num_layers=8, sp_size=2)  # 2 blocks per shard: sparse
    assert over_shards is None
    high = lemo_ds.parse_lemo_config({"keep_ratio": 0.9, "block_size": 64})  # round(0.9 n) < n from n = 5 blocks
    assert "use --seq-len 320 or more" in sparsity.too_short_warning(high, 250, num_layers=8)


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


def test_a_stopped_run_without_a_checkpoint_is_no_obstacle(tmp_path):
    """A run that stopped before its first checkpoint leaves nothing to continue: --resume says to run the same
    command instead, and a rerun may start over there (its files set aside); a finished run is still refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    output_dir.refuse_earlier_run(out)  # an empty metrics.jsonl: a run killed before its first step, nothing to lose
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": null}\n')
    metrics.write_json_atomic(out / "summary.json", {"status": "stopped", "stopped_at_step": 1, "ended_at": "t0",
                                                     "stop_reason": "the loss is nan at step 1; stopped"})  # fmt: skip
    assert output_dir.stopped_run(out)["stopped_at_step"] == 1
    assert output_dir.describe_stop(output_dir.stopped_run(out)) == "stopped at step 1 (the loss is nan at step 1)"
    with pytest.raises(TrainingSetupError, match=r"the earlier run stopped at step 1 \(the loss is nan at step 1\) "
                       r"before its first checkpoint; run the same command without --resume"):  # fmt: skip
        resume.require_checkpoint(out / "checkpoints")
    before = {name: (out / name).read_text() for name in output_dir.RUN_FILES}
    folder = output_dir.set_aside_stopped_run(out)
    assert folder == out / "stopped_runs" / "step1-t0" and output_dir.earlier_run(out) == []
    assert {name: (folder / name).read_text() for name in output_dir.RUN_FILES} == before
    metrics.write_json_atomic(out / "summary.json", {"status": "done"})
    assert output_dir.stopped_run(out) is None


def test_a_checkpoint_of_another_model_or_lora_rank_is_refused_before_any_collective(tmp_path):
    resume.save(_Engine(), tmp_path, 1, 2, ARGS)
    resume.require_same_weights(tmp_path, ARGS)
    with pytest.raises(TrainingSetupError, match=r"step1 was trained with --lora-r 8 and this run has --lora-r 4; "
                       "resume with --lora-r 8"):  # fmt: skip
        resume.require_same_weights(tmp_path, argparse.Namespace(**{**vars(ARGS), "lora_r": 4}))
    with pytest.raises(TrainingSetupError, match="was trained with --model tiny-llama and this run has --model x"):
        resume.require_same_weights(tmp_path, argparse.Namespace(**{**vars(ARGS), "model": "x"}))


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


# ---- nothing a user had is lost (issue 19): the small parts --------------------------------------------------


def test_strict_json_writes_nonfinite_numbers_as_null(tmp_path):
    record = {"loss": float("nan"), "per_layer": [1.0, float("inf")], "nested": {"x": -float("inf")}, "n": 3}
    assert json.loads(metrics.strict_json(record)) == {"loss": None, "per_layer": [1.0, None], "nested": {"x": None},
                                                       "n": 3}  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    metrics.MetricsLog(path).write({"step": 1, "loss": float("nan")})
    metrics.write_json_atomic(tmp_path / "summary.json", {"final_loss": float("inf")})
    for text in (path.read_text(), (tmp_path / "summary.json").read_text()):
        assert "NaN" not in text and "Infinity" not in text and "null" in text


def test_retention_keeps_the_newest_n_and_never_latest():
    complete = {"step2": 2, "step4": 4, "step6": 6, "step10": 10}
    assert retention.tags_to_delete(complete, [], "step10", keep=2) == ["step2", "step4"]  # by step, not by name
    assert retention.tags_to_delete(complete, [], "step2", keep=1) == ["step4", "step6"]  # latest rolled back
    assert retention.tags_to_delete(complete, [], "step10", keep=0) == []  # 0 keeps all
    # a save that died halfway below latest is a leftover; one above it (being written?) is left alone
    assert retention.tags_to_delete(complete, ["step3", "step12", "odd"], "step10", keep=0) == ["step3"]


def test_text_check_tells_text_from_bytes(tmp_path):
    assert text_check.bad_share("plain text\twith tabs\r\nand ünïcode\n".encode()) == 0.0
    assert text_check.bad_share(random.Random(0).randbytes(4096)) > 0.3
    assert text_check.bad_share(b"text" * 1000 + b"\x00" * 10) < text_check.MAX_BAD_SHARE  # a stray byte is fine
    cut = ("é" * (text_check.SAMPLE_BYTES // 2 - 1) + "aé").encode()[: text_check.SAMPLE_BYTES]  # ends mid-character
    assert text_check.bad_share(cut) == 0.0
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 100)
    assert "not UTF-8 text" in text_check.not_text_reason(binary)


def test_output_dir_guard(tmp_path):
    out = tmp_path / "run"
    output_dir.require_writable(out)  # creates it
    output_dir.refuse_earlier_run(out)  # empty: fine
    (out / "checkpoints").mkdir()
    output_dir.refuse_earlier_run(out)  # an empty checkpoints/ is no run either
    (out / "checkpoints" / "latest").write_text("step1")
    (out / "summary.json").write_text("{}")
    with pytest.raises(TrainingSetupError, match=r"holds an earlier run \(summary.json, checkpoints/\)"):
        output_dir.refuse_earlier_run(out)
    (out / "notes.txt").write_text("mine")
    output_dir.clear_earlier_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only what a run writes is deleted
    with pytest.raises(TrainingSetupError, match="cannot write there .*Not a directory"):
        output_dir.require_writable(out / "notes.txt" / "sub")


class _Engine(torch.nn.Module):
    """What resume.save needs of a DeepSpeed engine on one rank: weights to check (a module, as the engine is) and a
    checkpoint writer."""

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2) if module is None else module
        self.device = torch.device("cpu")

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), tag_dir / "mp_rank_00_model_states.pt")


ARGS = argparse.Namespace(seq_len=256, seed=0, data=None, model="tiny-llama", lora_r=8)


def test_save_refuses_nonfinite_weights_and_keeps_latest(tmp_path):
    engine = _Engine()
    resume.save(engine, tmp_path, 1, 2, ARGS)
    assert finite.trainable_weights_finite(engine)
    with torch.no_grad():
        engine.module.weight[0, 0] = float("inf")
    assert not finite.trainable_weights_finite(engine)
    with pytest.raises(TrainingStopped, match=r"NaN or inf after step 2; not saving .*'latest' still names step1"):
        resume.save(engine, tmp_path, 2, 4, ARGS)
    assert (tmp_path / resume.LATEST).read_text() == "step1" and not (tmp_path / "step2").exists()


def test_marker_checksums_catch_a_damaged_file_and_retention_prunes(tmp_path):
    engine = _Engine()
    for step in (1, 2, 3):
        resume.save(engine, tmp_path, step, 2 * step, ARGS, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step2", "step3"]
    marker = json.loads((tmp_path / "step3" / resume.COMPLETE).read_text())
    manifest = marker["files"]
    assert list(manifest) == ["mp_rank_00_model_states.pt"] and marker["world_size"] == 1
    assert checkpoint_files.damaged_files(tmp_path / "step3", manifest, 0, 1) == []
    weights = tmp_path / "step3" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[-30] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    assert checkpoint_files.damaged_files(tmp_path / "step3", manifest, 0, 1) == [
        "mp_rank_00_model_states.pt: SHA-256 differs from the marker's"
    ]
    weights.unlink()
    assert "No such file" in checkpoint_files.damaged_files(tmp_path / "step3", manifest, 0, 1)[0]
    found = resume.find_checkpoint(tmp_path)
    assert found.candidates == ("step3", "step2")  # load() verifies them in this order


def test_another_world_size_builds_the_engine_for_the_universal_load_before_any_collective(tmp_path):
    """Same number of ranks: the config as it was. Another: DeepSpeed's universal load turned on (the user's other
    "checkpoint" keys kept). Without ZeRO there is nothing to convert: refused, naming both counts."""
    resume.save(_Engine(), tmp_path, 1, 2, ARGS)
    zero3 = {"zero_optimization": {"stage": 3}, "checkpoint": {"tag_validation": "warn"}}
    assert resume.universal_config(tmp_path, 1, zero3) is zero3
    universal_zero3 = resume.universal_config(tmp_path, 4, zero3)
    assert universal_zero3["checkpoint"] == {"tag_validation": "warn", "load_universal": True}
    assert resume.universal_config(tmp_path, 4, {"zero_optimization": {"stage": 2}})["checkpoint"]["load_universal"]
    refused = r"saved by 1 ranks but this job has 4, and without ZeRO .*resume it on 1 ranks, or train with ZeRO stage"
    with pytest.raises(TrainingSetupError, match=refused):
        resume.universal_config(tmp_path, 4, {"zero_optimization": {"stage": 0}})
    assert resume.universal_config(tmp_path / "none", 4, {}) == {}  # nothing to resume: --resume auto starts fresh


def test_a_failed_conversion_is_one_line_and_leaves_no_folder(tmp_path):
    """DeepSpeed's converter on a tag without ZeRO optimizer partitions (what _Engine writes) fails: the error names
    the tag and the converter's last lines, and neither the temporary folder nor a universal one stays."""
    from lemo_ds.training import universal

    resume.save(_Engine(), tmp_path, 1, 2, ARGS)
    with pytest.raises(RuntimeError, match=r"universal-checkpoint conversion of .*step1 failed: .+"):
        universal.convert(tmp_path / "step1")
    assert sorted(p.name for p in (tmp_path / "step1").iterdir()) == [resume.COMPLETE, "mp_rank_00_model_states.pt"]
    assert universal.converted(tmp_path / "step1") is None


def test_save_writes_the_predictors_into_the_tag_and_resume_restores_them(tmp_path):
    """A predictor job's save puts the scorer's state beside DeepSpeed's files (in the marker's manifest); a resumed
    predictor job restores it, an oracle job ignores it, and the bank is a predictors file another job can read."""
    from test_predictors_scorer import batches, converted

    from lemo_ds.predictors import calibrate, read_metadata
    from lemo_ds.predictors.scorer import CHECKPOINT_BANK, CHECKPOINT_STATE, find_predictor_scorer

    model = converted()
    calibrate(model, batches(1, seed=4), updates=1)
    resume.save(_Engine(model), tmp_path, 1, 2, ARGS)
    tag = tmp_path / "step1"
    manifest = json.loads((tag / resume.COMPLETE).read_text())["files"]
    assert {CHECKPOINT_BANK, CHECKPOINT_STATE} <= set(manifest)
    assert read_metadata(tag / CHECKPOINT_BANK)["info"] == {"checkpoint_step": 1}
    lines = []
    cpu = torch.device("cpu")
    fresh = converted()
    assert resume.restore_predictors(fresh, tag, cpu, lines.append)
    assert lines == [f"predictors restored from {tag / CHECKPOINT_BANK} (layers [2]), not calibrated again"]
    assert find_predictor_scorer(fresh).all_trained
    assert not resume.restore_predictors(converted({"scorer": "oracle"}), tag, cpu, lines.append)
    assert len(lines) == 1  # an oracle job says nothing of them
    reused = converted({"predictor_path": str(tag / CHECKPOINT_BANK)})  # --predictor FILE
    find_predictor_scorer(reused).bind(reused.config)


def test_a_predictor_job_resuming_a_checkpoint_without_predictors_says_what_it_loses(tmp_path):
    from test_predictors_scorer import SECTION, converted

    from lemo_ds.predictors.scorer import CHECKPOINT_BANK, find_predictor_scorer

    resume.save(_Engine(), tmp_path, 1, 2, ARGS)  # no predictor scorer: nothing but DeepSpeed's files
    tag = tmp_path / "step1"
    assert sorted(path.name for path in tag.iterdir()) == [resume.COMPLETE, "mp_rank_00_model_states.pt"]
    lines = []
    assert not resume.restore_predictors(converted(), tag, torch.device("cpu"), lines.append)
    assert lines == [f"warning: {tag} holds no predictors (a checkpoint of a job with another scorer, or of an older "
                     "lemo_ds): they are trained again from the start on the rows after the checkpoint, so the "
                     "selections differ from an uninterrupted run's"]  # fmt: skip
    # With a predictors file: the same file again, which only online refreshes would have changed.
    source = converted()
    scorer = find_predictor_scorer(source)
    scorer.bind(source.config)
    scorer.save(str(tmp_path / CHECKPOINT_BANK))  # (untrained: only the file's presence matters here)
    for refresh_every, expected in ((0, None), (2, f"start again from {tmp_path / CHECKPOINT_BANK}, without the")):
        lines = []
        predictor = {**SECTION["predictor"], "refresh_every": refresh_every}
        model = converted({"predictor_path": str(tmp_path / CHECKPOINT_BANK), "predictor": predictor})
        assert not resume.restore_predictors(model, tag, torch.device("cpu"), lines.append)
        assert (lines == []) if expected is None else (len(lines) == 1 and expected in lines[0]), lines


# ---- the job description, and lemo_ds.initialize given the parsed section ------------------------------------


def test_the_job_is_described_once_frozen_and_without_the_lemo_section(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("WORLD_SIZE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    train = load_launch_script("train")
    args = train.parse_args(["--seq-len", "256", "--data", str(corpus), "--output-dir", str(tmp_path / "out")])
    job = describe(args)
    assert isinstance(job.lemo, lemo_ds.LemoConfig) and job.lemo.keep_ratio == 0.6  # ds_configs/zero3_lemo.json
    assert "lemo" not in job.ds_config and job.ds_config["train_micro_batch_size_per_gpu"] == 1
    assert (job.dims.world_size, job.dims.sp, job.dims.dp) == (1, 1, 1)
    assert job.dims.rows_per_step == job.dims.micro_batch * job.dims.grad_accum
    assert job.files == (corpus,) and job.ckpt_dir == tmp_path / "out" / "checkpoints" and job.save
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.seq_len = 512


def test_initialize_takes_the_parsed_section_and_the_scorer_built_once(monkeypatch):
    from types import SimpleNamespace

    from tiny_models import tiny_model

    import lemo_ds.engine
    import lemo_ds.inject
    from lemo_ds.errors import LemoConfigError
    from lemo_ds.scorers import build_scorer

    seen = {}

    def fake_deepspeed_initialize(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(global_steps=0), None, None, None

    monkeypatch.setattr(lemo_ds.engine.deepspeed, "initialize", fake_deepspeed_initialize)
    section = lemo_ds.parse_lemo_config({"keep_ratio": 0.5, "scorer": "norm"})
    scorer = build_scorer(section)

    def built_again(config):
        raise AssertionError("apply_lemo built a second scorer")

    monkeypatch.setattr(lemo_ds.inject, "build_scorer", built_again)
    model = tiny_model("llama")
    engine, *_ = lemo_ds.initialize(
        model=model, config={"train_micro_batch_size_per_gpu": 1}, lemo_config=section, lemo_scorer=scorer
    )
    assert lemo_ds.get_controller(model).config is section  # converted with that very section
    assert seen["config"] == {"train_micro_batch_size_per_gpu": 1}
    with pytest.raises(LemoConfigError, match="lemo_config too; give one of them"):
        lemo_ds.initialize(model=tiny_model("llama"), config={"lemo": {}}, lemo_config=section)



# ---- LoRA adapters in the training dtype under ZeRO-3 -----------------------------------------------------------


def test_zero3_keeps_peft_float32_adapters_unless_add_lora_casts_them():
    """A model built in zero.Init (as launch/train.py builds it under ZeRO-3) keeps peft's float32 adapters through
    deepspeed.initialize, so each adapter would copy its bf16 input to float32; add_lora(dtype=bf16) holds them in
    bf16, DeepSpeed's optimizer keeps float32 masters, and steps move them. In a process of its own: DeepSpeed keeps
    its process groups in module globals that outlive the group (a later in-process engine would find them)."""
    import subprocess
    import sys

    script = Path(__file__).with_name("zero3_lora_dtype.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {"None": ["float32", "float32", True], "bfloat16": ["bfloat16", "float32", True]}, found


def test_every_launcher_prints_a_stop_as_one_line():
    """lemo_ds.errors.error_line, which launch/train.py, train_hf.py, train_megatron.py and train_predictor.py print:
    a message of several lines (a config error lists its keys) becomes one line per rank in a log."""
    from lemo_ds.errors import LemoConfigError, error_line

    error = LemoConfigError("lemo.memory: two problems:\n  resident_checkpoints 2 needs offload\n\n  and more")
    assert error_line(error) == (
        "lemo_ds: error: lemo.memory: two problems: resident_checkpoints 2 needs offload; and more"
    )


def test_an_error_line_is_one_write_so_ranks_sharing_a_pipe_do_not_run_together(monkeypatch):
    """Under the deepspeed launcher every rank is ``python -u``: print() would write the text and its newline apart,
    and two ranks' lines on one pipe came out as one line (CI, test_sequence_parallel). lemo_ds.errors.print_error_line
    writes the line with its newline at once; so does the peer watch's default writer."""
    import inspect
    import io

    from lemo_ds.errors import LemoConfigError, print_error_line
    from lemo_ds.training import peers

    class Writes(io.StringIO):
        calls: list[str]

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    stream = Writes()
    stream.calls = []
    monkeypatch.setattr("sys.stderr", stream)
    print_error_line(LemoConfigError("bad\nkey"))
    assert stream.calls == ["lemo_ds: error: bad; key\n"]
    stream.calls.clear()
    write = inspect.signature(peers.PeerWatch.__init__).parameters["write"].default
    write("lemo_ds: error: a peer is gone")
    assert stream.calls == ["lemo_ds: error: a peer is gone\n"]
