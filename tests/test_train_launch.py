"""launch/train.py end to end: real DeepSpeed (CPU ranks over gloo), real models, no mocks.

Multi-rank runs go through the ``deepspeed`` launcher; the cheaper checks run one process without it
(``python launch/train.py``), which the job supports as a world of one. The jobs run with TRITON_INTERPRET=0:
conftest.py turns Triton's CPU interpreter on for the kernel tests, and a training job on CPU would then run
its gather/write-back kernels interpreted, many times slower than the PyTorch path a CPU user gets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from launch_util import (
    JOB_ENV,
    REPO,
    TRAIN,
    deepspeed_command,
    load_launch_script,
    ok,
    remove_cpu_comm_buffers,
    run_deepspeed,
    summary,
    train_single,
)

LEMO = "ds_configs/zero3_lemo.json"
FAST = ("--seq-len", "256")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- two ranks, ZeRO-3 + lemo: the README command, then an interrupted run resumed ----------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3_lemo_4")
    ok(
        run_deepspeed(
            TRAIN, "--deepspeed", LEMO, *FAST, "--max-steps", "4", "--save-every", "2", "--output-dir", str(out),
            timeout=300, env=JOB_ENV,
        )
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_two_ranks_zero3_lemo_writes_summary(uninterrupted):
    result = summary(uninterrupted)
    assert result["steps"] == 4 and result["steps_this_run"] == 4
    assert result["world_size"] == 2
    assert result["zero_stage"] == 3
    assert result["model"] == "tiny-llama" and result["seq_len"] == 256 and result["lora_r"] == 8
    assert result["scorer"] == "predictor"
    assert result["mean_keep_ratio"] < 1.0
    per_layer = result["keep_ratio_per_layer"]
    assert len(per_layer) == 8 and per_layer[:4] == [1.0] * 4  # dense_layers "first_half"
    assert all(r < 1.0 for r in per_layer[4:])
    assert math.isfinite(result["final_loss"]) and result["tokens_per_s"] > 0
    assert result["peak_mem_kind"] == "host_max_rss" and result["peak_mem_bytes"] > 0
    assert result["grad_ckpt"] == "deepspeed"
    assert result["elapsed_s"] > 0 and "launch/train.py" in result["command"]
    records = metrics(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["tokens"] == 2 * 256 for r in records)  # two ranks x one row of 256 tokens per step
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == "step4"
    assert sorted(p.name for p in (uninterrupted / "checkpoints").glob("step*")) == ["step2", "step4"]


@pytest.mark.slow
def test_resume_continues_the_loss_curve(uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    common = ("--deepspeed", LEMO, *FAST, "--output-dir", str(out))
    ok(run_deepspeed(TRAIN, *common, "--max-steps", "2", timeout=300, env=JOB_ENV))
    ok(run_deepspeed(TRAIN, *common, "--max-steps", "4", "--resume", timeout=300, env=JOB_ENV))
    resumed, reference = metrics(out), metrics(uninterrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for mine, theirs in zip(resumed, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), (resumed, reference)
        assert mine["lr"] == pytest.approx(theirs["lr"])
    result = summary(out)
    assert result["steps"] == 4 and result["steps_this_run"] == 2 and result["resumed_from_step"] == 2


# ---- other configs and models, one process --------------------------------------------------------------------


SHORT = (*FAST, "--max-steps", "2", "--no-save")


@pytest.mark.slow
def test_dense_config_trains_dense_and_logs_to_wandb_offline(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3_dense.json").read_text())
    config["wandb"] = {"enabled": True, "project": "lemo_ds_test"}  # DeepSpeed's own monitor section
    path = tmp_path / "dense_wandb.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    ok(train_single("--deepspeed", str(path), *SHORT, "--output-dir", str(out), env=env))
    result = summary(out)
    assert result["scorer"] is None and result["mean_keep_ratio"] == 1.0 and result["zero_stage"] == 3
    assert not (out / "checkpoints").exists()  # --no-save
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_dense_stack_config_is_the_plain_dense_job(tmp_path):
    """zero3_dense_stack.json (lemo's memory stack, every layer dense) computes what zero3_dense.json (plain
    DeepSpeed, Hugging Face's loss) does: the segment loss is exact and both attend within the packed documents."""
    losses = {}
    for name in ("zero3_dense", "zero3_dense_stack"):
        out = tmp_path / name
        ok(train_single("--deepspeed", f"ds_configs/{name}.json", *SHORT, "--output-dir", str(out)))
        losses[name] = [record["loss"] for record in metrics(out)]
        assert summary(out)["mean_keep_ratio"] == 1.0
    assert len(losses["zero3_dense"]) == 2
    assert losses["zero3_dense_stack"] == pytest.approx(losses["zero3_dense"], rel=1e-5)


def test_zero2_full_finetune_mistral_with_hf_checkpointing(tmp_path):
    flags = ("--deepspeed", "ds_configs/zero2_lemo.json", "--model", "tiny-mistral", "--lora-r", "0")
    ok(train_single(*flags, "--grad-ckpt", "hf", *SHORT, "--output-dir", str(tmp_path)))
    result = summary(tmp_path)
    assert result["zero_stage"] == 2 and result["model_type"] == "mistral" and result["lora_r"] == 0
    assert result["grad_ckpt"] == "hf" and result["mean_keep_ratio"] < 1.0


@pytest.mark.slow
def test_main_job_with_hf_checkpointing_equals_no_checkpointing(tmp_path):
    # Hugging Face's checkpointing (how Trainer turns it on) of the main job's model: default lemo section (sparse
    # layers in a row, dense last layer), LoRA, ZeRO-3. Recomputation must not change the losses.
    losses = {}
    for mode in ("hf", "off"):
        out = tmp_path / mode
        ok(train_single("--deepspeed", LEMO, "--grad-ckpt", mode, *FAST, "--max-steps", "3", "--no-save",
                        "--output-dir", str(out)))  # fmt: skip
        assert summary(out)["grad_ckpt"] == mode and summary(out)["mean_keep_ratio"] < 1.0
        losses[mode] = [record["loss"] for record in metrics(out)]
    assert len(losses["hf"]) == 3
    assert losses["hf"] == pytest.approx(losses["off"], rel=1e-5)


def _save_model_dir(path: Path) -> None:
    """A Hugging Face model directory made here: a 4-layer Qwen2 and a byte-level BPE tokenizer (no merges)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lemo_ds.training.presets import preset_config

    vocab = {t: i for i, t in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("tiny-qwen2", num_hidden_layers=4)).save_pretrained(path)


@pytest.mark.slow
def test_model_directory_jsonl_data_zero3_lemo_without_checkpointing(tmp_path):
    model_dir = tmp_path / "model"
    _save_model_dir(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (20 + i)}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    flags = ("--deepspeed", LEMO, "--model", str(model_dir), "--data", str(corpus), "--grad-ckpt", "off")
    ok(train_single(*flags, *SHORT, "--output-dir", str(out)))
    result = summary(out)
    assert result["model_type"] == "qwen2" and result["model"] == str(model_dir) and result["grad_ckpt"] == "off"
    assert len(result["keep_ratio_per_layer"]) == 4 and result["mean_keep_ratio"] < 1.0


# ---- bad input: one line on stderr, exit status 2, no hang ------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").mkdir()
    (root / "empty" / "nothing.txt").write_text("")
    (root / "short.txt").write_text("too short")
    config = json.loads((REPO / LEMO).read_text())
    config["lemo"]["keep_ratio"] = 1.5
    (root / "bad.json").write_text(json.dumps(config))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    config["lemo"]["keep_ratio"] = "0.4"  # a number as a string: strict types, no conversion
    (root / "string_ratio.json").write_text(json.dumps(config))
    (root / "random.bin").write_bytes(random.Random(0).randbytes(200_000))
    earlier = root / "earlier_run"  # what a finished run leaves
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    return {"root": root}


BAD = {
    "missing data": (("--data", "{root}/nope"), "--data {root}/nope: no such file or folder"),
    "empty corpus": (("--data", "{root}/empty"), "the corpus holds no text"),
    "too few tokens": (("--data", "{root}/short.txt"), "fewer than one sequence of --seq-len 256"),
    "seq shorter than a block": (("--seq-len", "32"), "--seq-len 32 is shorter than one lemo block (block_size 64)"),
    "unsupported family": (("--model", "{root}/gpt2"), "no injection policy for model type 'gpt2'"),
    "bad lemo config": (("--deepspeed", "{root}/bad.json"), "lemo.keep_ratio: 1.5 is out of range"),
    "unknown model": (("--model", "tiny-gpt"), "--model tiny-gpt: neither a model directory nor a preset"),
    "resume without checkpoint": (("--resume",), "--resume: no checkpoint in"),
    "missing predictor": (("--predictor", "{root}/nope.pt"), "--predictor {root}/nope.pt: no such file"),
    "string keep ratio": (("--deepspeed", "{root}/string_ratio.json"), "lemo.keep_ratio"),
    "random bytes as data": (("--data", "{root}/random.bin"), "--data {root}/random.bin: not text: "),
    "earlier run, no --resume": (
        ("--output-dir", "{root}/earlier_run"),
        "--output-dir {root}/earlier_run holds an earlier run (metrics.jsonl); continue it with --resume",
    ),
}


@pytest.fixture(scope="module")
def train_module():
    """launch/train.py imported as a module, to call its main() in this process."""
    return load_launch_script("train")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case, bad_inputs, tmp_path, train_module, monkeypatch, capsys):
    # Every case fails in the checks that run before distributed start, so main() can run in this process;
    # a world of one set here (and restored by monkeypatch) keeps it from editing this process's environment.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    flags, expected = BAD[case]
    root = str(bad_inputs["root"])
    flags = [flag.format(root=root) for flag in flags]
    status = train_module.main(["--seq-len", "256", "--max-steps", "1", "--output-dir", str(tmp_path / "out"), *flags])
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("lemo_ds: error: ")]
    assert len(errors) == 1, stderr
    assert expected.format(root=root) in errors[0]


def test_bad_input_exits_2_without_traceback(tmp_path):
    result = train_single("--model", "tiny-gpt", "--output-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("lemo_ds: error: --model tiny-gpt")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_input_stops_every_rank(bad_inputs, tmp_path):
    result = run_deepspeed(
        TRAIN, "--deepspeed", str(bad_inputs["root"] / "bad.json"), "--output-dir", str(tmp_path), timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # Each rank stops on its own; the launcher may kill one before it prints once the other has failed.
    assert 'lemo_ds: error: invalid "lemo" config section' in output
    assert "Traceback" not in output


# ---- nothing a user had is lost (issue 19) -----------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` and its SHA-256: what "nothing touched" compares."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def strict_records(out: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity fails the test."""

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=reject) for line in (out / "metrics.jsonl").read_text().splitlines()]


def errors_of(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "lemo_ds: error: " in line]


@pytest.mark.slow
def test_rerun_without_resume_is_refused_and_touches_nothing(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = snapshot(out)
    result = run_deepspeed(TRAIN, "--deepspeed", LEMO, *FAST, "--max-steps", "2", "--output-dir", str(out),
                           timeout=300, env=JOB_ENV)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = errors_of(result)
    assert errors and all("holds an earlier run" in line and "--resume" in line for line in errors), errors
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_damaged_latest_falls_back_to_the_newest_good_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    ckpt = out / "checkpoints"
    damaged = ckpt / "step4" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a truncated copy
    result = run_deepspeed(TRAIN, "--deepspeed", LEMO, *FAST, "--max-steps", "4", "--resume", "--save-every", "1",
                           "--keep-checkpoints", "2", "--output-dir", str(out), timeout=300, env=JOB_ENV)  # fmt: skip
    ok(result)
    assert f"checkpoint {ckpt / 'step4'} is damaged (zero_pp_rank_0_mp_rank_00_model_states.pt: " in result.stdout
    assert f"resumed from {ckpt / 'step2'} at step 2" in result.stdout
    records, reference = strict_records(out), metrics(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for mine, theirs in zip(records, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), (records, reference)
    # step4 saved again, whole; --keep-checkpoints 2 kept step3 and step4 and deleted step2
    assert (ckpt / "latest").read_text() == "step4"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step3", "step4"]
    marker = json.loads((ckpt / "step4" / "lemo_ds_complete.json").read_text())
    assert marker["files"]["zero_pp_rank_0_mp_rank_00_model_states.pt"][0] == damaged.stat().st_size


@pytest.mark.slow
def test_nonfinite_loss_stops_before_saving(tmp_path):
    # The warm-up keeps the first steps' rate small; the loss turns non-finite within 4 steps (step 4 here).
    out = tmp_path / "run"
    result = run_deepspeed(TRAIN, "--deepspeed", LEMO, *FAST, "--lr", "1e38", "--lora-r", "0", "--max-steps", "6",
                           "--save-every", "2", "--output-dir", str(out), timeout=300, env=JOB_ENV)  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    records = strict_records(out)
    bad = records[-1]
    assert bad["loss"] is None and bad["loss_nonfinite"] in ("nan", "inf", "-inf"), records
    assert [r["step"] for r in records] == list(range(1, bad["step"] + 1)) and bad["step"] < 6
    assert all(math.isfinite(r["loss"]) for r in records[:-1])
    ckpt = out / "checkpoints"
    saved = sorted(int(m.parent.name.removeprefix("step")) for m in ckpt.glob("step*/lemo_ds_complete.json"))
    assert all(step < bad["step"] for step in saved)  # nothing saved at or after the bad step
    latest = (ckpt / "latest").read_text() if saved else None
    assert latest == (f"step{saved[-1]}" if saved else None)
    note = f"'latest' still names {latest}" if latest else "no complete checkpoint yet"
    errors = errors_of(result)
    assert errors and all(
        f"the loss is {bad['loss_nonfinite']} at step {bad['step']}; stopped without saving ({note})" in line
        for line in errors
    ), errors
    assert "Traceback" not in result.stderr
    # summary.json says the run stopped, where, why and what a --resume continues from (issue 32)
    stopped = json.loads((out / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["stopped_at_step"] == bad["step"]
    assert stopped["steps"] == bad["step"] - 1 and stopped["resumable_from"] == latest
    assert errors[0].endswith(stopped["stop_reason"])


def _config_with(tmp_path: Path, name: str, **changes) -> str:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config.update(changes)
    path = tmp_path / f"{Path(name).stem}_{'_'.join(f'{k}{v}' for k, v in changes.items())}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _back_to(out: Path, step: int) -> None:
    """The run as it stood after checkpoint ``step``: later tags gone, ``latest`` naming it (a job lost after it)."""
    for tag in (out / "checkpoints").glob("step*"):
        if int(tag.name.removeprefix("step")) > step:
            shutil.rmtree(tag)
    (out / "checkpoints" / "latest").write_text(f"step{step}")


def _same_curve(resumed: Path, reference: Path) -> None:
    mine, theirs = metrics(resumed), metrics(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (mine, theirs)
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_on_the_same_loss_curve(uninterrupted, tmp_path):
    """ZeRO-3, LoRA: the 2-rank run's step-2 checkpoint resumed on one rank with 2 accumulation steps (the same global
    batch of two rows) continues the uninterrupted 2-rank run's losses and learning rates: the same rows, weights,
    Adam moments and schedule. The conversion is made once inside the tag, which keeps its own files; a leftover of a
    conversion killed midway is not trusted."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    _back_to(out, 2)
    tag = out / "checkpoints" / "step2"
    own_files = snapshot(tag)
    (tag / ".universal.tmp").mkdir()
    (tag / ".universal.tmp" / "half_written").write_text("x")
    gas2 = _config_with(tmp_path, "zero3_lemo.json", gradient_accumulation_steps=2)
    result = train_single("--deepspeed", gas2, *FAST, "--max-steps", "4", "--resume", "--output-dir", str(out))
    ok(result)
    _same_curve(out, uninterrupted)
    assert (
        f"lemo_ds: resumed from {tag} at step 2 (4 rows consumed), saved by 2 ranks, on 1 through DeepSpeed's "
        f"universal checkpoint (converted to {tag / 'universal'})"
    ) in result.stdout.splitlines()
    after = snapshot(tag)  # the tag's own files as they were, the leftover gone, the conversion beside them
    assert {name: digest for name, digest in after.items() if not name.startswith("universal/")} == own_files
    assert any(name.startswith("universal/zero/") for name in after)
    done = summary(out)
    assert done["world_size"] == 1 and done["resumed_from_step"] == 2 and done["steps"] == 4


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks_zero2_full_finetuning(tmp_path):
    """ZeRO-2, full fine-tuning (--lora-r 0), the other way: a one-rank run with 2 accumulation steps, its step-2
    checkpoint resumed on two ranks with one, against the one-rank run uninterrupted to step 4."""
    common = (*FAST, "--lora-r", "0", "--save-every", "2")
    reference = tmp_path / "one_rank"
    gas2 = _config_with(tmp_path, "zero2_lemo.json", gradient_accumulation_steps=2)
    ok(train_single("--deepspeed", gas2, *common, "--max-steps", "4", "--output-dir", str(reference)))
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _back_to(out, 2)
    gas1 = _config_with(tmp_path, "zero2_lemo.json", gradient_accumulation_steps=1)
    result = run_deepspeed(TRAIN, "--deepspeed", gas1, *common, "--max-steps", "4", "--resume", "--output-dir",
                           str(out), timeout=300, env=JOB_ENV)  # fmt: skip
    ok(result)
    _same_curve(out, reference)
    assert "saved by 1 ranks, on 2 through DeepSpeed's universal checkpoint (converted to" in result.stdout
    assert summary(out)["world_size"] == 2


def _user_namespace_root() -> bool:
    """Mounts (tmpfs, read-only binds) are allowed here: in a user and mount namespace of our own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _user_namespace_root(), reason="no unprivileged user namespaces: cannot mount a small or read-only folder"
)


def run_in_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``script`` (bash) in a user and mount namespace of its own, with the deepspeed launcher on PATH as DEEPSPEED.
    The launcher's ranks live in it too, so they see the mounts the script makes."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **JOB_ENV, "DS_ACCELERATOR": "cpu", "T": str(tmp_path)}
    command = " ".join(deepspeed_command(TRAIN, "--deepspeed", LEMO, *FAST))
    environment["DEEPSPEED"] = command
    port = command.split("--master_port ")[1].split()[0]
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], cwd=REPO,
                              env=environment, text=True, capture_output=True, timeout=300)  # fmt: skip
    finally:
        remove_cpu_comm_buffers(port)


@pytest.mark.slow
@needs_mounts
def test_read_only_output_dir_is_one_line_on_every_rank(tmp_path):
    (tmp_path / "ro").mkdir()
    script = 'mount --bind "$T/ro" "$T/ro" && mount -o remount,bind,ro "$T/ro" && $DEEPSPEED --output-dir "$T/ro/run"'
    result = run_in_namespace(script, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = errors_of(result)
    assert errors and all(
        f"--output-dir {tmp_path / 'ro' / 'run'}: cannot write there" in line and "Read-only file system" in line
        for line in errors
    ), errors
    assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr
    assert not list((tmp_path / "ro").iterdir())


@pytest.mark.slow
@needs_mounts
def test_disk_full_during_save_is_one_line_and_latest_stays(uninterrupted, tmp_path):
    # A real full disk: a tmpfs just big enough for the run so far plus a little (ENOSPC from the kernel).
    run = tmp_path / "src"
    shutil.copytree(uninterrupted, run, ignore=shutil.ignore_patterns("step4"))
    (run / "checkpoints" / "latest").write_text("step2")
    (run / "checkpoints" / "step4").mkdir()  # (dropped above to save room; an empty, incomplete tag)
    size_kib = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024 + 3072
    script = (
        f'mkdir -p "$T/disk" && mount -t tmpfs -o size={size_kib}k tmpfs "$T/disk" && cp -a "$T/src" "$T/disk/run" '
        '&& { $DEEPSPEED --max-steps 3 --resume --output-dir "$T/disk/run"; rc=$?; cp -a "$T/disk/run" "$T/after"; '
        "exit $rc; }"
    )
    result = run_in_namespace(script, tmp_path)
    assert result.returncode != 0, result.stdout[-3000:]
    errors = errors_of(result)
    tag = tmp_path / "disk" / "run" / "checkpoints" / "step3"
    assert errors and all(
        f"saving checkpoint {tag} failed: No space left on device (ENOSPC)" in line
        and "'latest' still names step2" in line
        for line in errors
    ), (errors, result.stderr[-3000:])
    ckpt = tmp_path / "after" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step2"
    assert not (ckpt / "step3" / "lemo_ds_complete.json").exists()
    marker = json.loads((ckpt / "step2" / "lemo_ds_complete.json").read_text())
    assert snapshot(ckpt / "step2") == snapshot(run / "checkpoints" / "step2") and marker["step"] == 2
