"""Issue 32's table, one test per row: what a user meets following the README on a fresh CPU machine, and what they
expect instead. Real jobs (``python launch/train.py`` as a world of one, the deepspeed launcher for the Trainer
snippet), real DeepSpeed and transformers, no mocks: each test asserts the exit status, the one line the user reads
and the files left behind.

| row | the user's case | test |
|---|---|---|
| 1 | ``--resume --lr`` after a NaN stop | test_lr_on_resume_takes_effect_and_says_so |
| 2 | ``--lr nan``, ``--lr -1`` | test_a_bad_learning_rate_is_one_line_and_exit_2 |
| 3 | ``--seq-len 100`` | test_a_length_too_short_to_sparsify_is_one_warning |
| 4 | a stop (NaN, disk full) before any checkpoint | test_a_stop_before_the_first_checkpoint_then_the_same_command |
| 5 | README's Trainer snippet, shipped config | test_the_trainer_snippet_takes_the_shipped_config_as_given |
| 6 | a Trainer checkpoint, shipped ZeRO-3 config | test_a_trainer_checkpoint_loads_with_from_pretrained |
| 7 | DeepSpeed's log lines, a slow first start | test_deepspeed_output_goes_to_a_log_and_a_first_start_says_why |
| 8 | ``--help`` | test_help_shows_the_defaults |
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_util import JOB_ENV, REPO, REPORT_DIR_ENV, TRAIN, ok, run_deepspeed, summary, train_single
from test_train_launch import _user_namespace_root

# Full fine-tuning at lr 1e38: the warm-up (2e-5 at step 1, then a fifth of the peak per step) keeps the first steps
# finite; the loss turns NaN a few steps in (step 4 on one rank).
NAN_JOB = ("--seq-len", "128", "--lora-r", "0", "--lr", "1e38", "--max-steps", "6")


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "lemo_ds: error: " in line]


def lines_with(result: subprocess.CompletedProcess, text: str) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if text in line]


def records(out: Path) -> list[dict]:
    """metrics.jsonl as strict JSON (a bare NaN fails)."""

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=reject) for line in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def complete_tags(out: Path) -> list[str]:
    return sorted(marker.parent.name for marker in (out / "checkpoints").glob("step*/lemo_ds_complete.json"))


# ---- row 1: --lr on resume ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_after_a_checkpoint(tmp_path_factory) -> Path:
    """A run that saved step 2, then stopped on a NaN loss (exit 3), as the issue's user met it."""
    out = tmp_path_factory.mktemp("row1") / "run"
    result = train_single(*NAN_JOB, "--save-every", "2", "--output-dir", str(out))
    assert result.returncode == 3, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_lr_on_resume_takes_effect_and_says_so(nan_after_a_checkpoint):
    out = nan_after_a_checkpoint
    stopped = summary(out)
    assert stopped["status"] == "stopped" and stopped["resumable_from"] == "step2"
    assert "then continue with --resume" in stopped["stop_reason"]
    restored = records(out)[2]["lr"]  # step 3's rate: what the step-2 checkpoint restores (2e37)

    # A flag that cannot take effect on resume is refused with one line, and nothing is touched.
    before = snapshot(out)
    refused = train_single(*NAN_JOB[:2], "--lora-r", "4", "--resume", "--output-dir", str(out), timeout=120)
    assert refused.returncode == 2 and errors(refused) == [
        f"lemo_ds: error: --resume: {out / 'checkpoints' / 'step2'} was trained with --lora-r 0 and this run has "
        "--lora-r 4; resume with --lora-r 0, or start a new run in another --output-dir"
    ], refused.stderr[-3000:]
    assert snapshot(out) == before

    # The NaN message's advice: continue with --resume and a lower --lr. It now takes effect, in one line.
    result = ok(train_single(*NAN_JOB[:4], "--lr", "1e-4", "--max-steps", "6", "--save-every", "2", "--resume",
                             "--output-dir", str(out)))  # fmt: skip
    said = lines_with(result, "on resume")
    assert len(said) == 1, result.stdout
    match = re.fullmatch(r"lemo_ds: --lr 0\.0001 on resume: the learning rate is now (\S+), the WarmupLR schedule's "
                         r"rate at this step for --lr 0\.0001 \(the checkpoint had (\S+)\)", said[0])  # fmt: skip
    assert match and float(match.group(2)) == pytest.approx(restored, rel=1e-5), said
    now = float(match.group(1))
    steps = records(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(r["loss"] is not None for r in steps)
    assert steps[2]["lr"] == pytest.approx(now) and 0 < now < 1e-4  # step 3: the warm-up's rate for a 1e-4 peak
    assert steps[2]["lr_on_resume"] == {"lr": 1e-4, "now": pytest.approx(now), "checkpoint_lr": pytest.approx(restored)}
    assert all(0 < r["lr"] <= 1e-4 for r in steps[2:])
    done = summary(out)
    assert done["status"] == "done" and done["resumed_from_step"] == 2 and done["lr_on_resume"]["lr"] == 1e-4
    assert (out / "checkpoints" / "latest").read_text() == "step6" and "step6" in complete_tags(out)


# ---- row 2: bad numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "-1"])
def test_a_bad_learning_rate_is_one_line_and_exit_2(value, tmp_path):
    result = train_single("--lr", value, "--output-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"lemo_ds: error: argument --lr: '{value}' is not a learning rate; give a positive number, e.g. 2e-4 "
        "(see --help)"
    ]
    assert result.stdout == "" and not (tmp_path / "out").exists()


# ---- row 3: too short to sparsify ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_length_too_short_to_sparsify_is_one_warning(tmp_path):
    out = tmp_path / "out"
    result = ok(train_single("--seq-len", "100", "--max-steps", "1", "--no-save", "--output-dir", str(out)))
    assert lines_with(result, "warning") == [
        "lemo_ds: warning: --seq-len 100 is too short for token elimination: 2 blocks of 64 tokens, and a sparse "
        "layer keeps 2 (keep_ratio 0.6; the first and any partial last block are always kept), so this run trains "
        "dense; use --seq-len 128 or more for lemo to skip blocks"
    ]
    assert summary(out)["mean_keep_ratio"] == 1.0  # dense, as the line says
    assert [r["step"] for r in records(out)] == [1]


# ---- row 4: a stop before the first checkpoint ---------------------------------------------------------------




# the stop, the rerun, a copy of the folder after the stop, the folder's path as the jobs saw it
Outcome = tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, Path, Path]


def _nan_before_a_checkpoint(out: Path) -> Outcome:
    """The NaN run (it saves only at the end, never reached), --resume (refused: nothing to resume), then the same
    command with a lower --lr."""
    first = train_single(*NAN_JOB, "--output-dir", str(out))
    shutil.copytree(out, out.parent / "stopped")  # the stopped run's files, to compare with what is set aside
    resumed = train_single(*NAN_JOB, "--resume", "--output-dir", str(out), timeout=120)
    assert resumed.returncode == 2 and len(errors(resumed)) == 1, resumed.stderr[-3000:]
    assert errors(resumed)[0].startswith(f"lemo_ds: error: --resume: no checkpoint in {out / 'checkpoints'}: the "
                                         "earlier run stopped at step ")  # fmt: skip
    assert errors(resumed)[0].endswith("before its first checkpoint; run the same command without --resume (it "
                                       "starts over from step 0)")  # fmt: skip
    again = train_single(*NAN_JOB[:4], "--lr", "1e-4", "--max-steps", "2", "--output-dir", str(out))
    return first, again, out.parent / "stopped", out


def _disk_full_before_a_checkpoint(out: Path) -> Outcome:
    """On a 512 KiB tmpfs the end-of-run save fails; then the disk grows (remount) and the same command runs again.
    Both in a user and mount namespace of their own."""
    job = " ".join([sys.executable, str(TRAIN), "--seq-len", "128", "--max-steps", "1", "--output-dir", "$T/disk/run"])
    script = (
        'mkdir -p "$T/disk" && mount -t tmpfs -o size=512k tmpfs "$T/disk" || exit 99; '
        f'{job} > "$T/first.out" 2> "$T/first.err"; echo $? > "$T/first.rc"; cp -a "$T/disk/run" "$T/stopped"; '
        f'mount -o remount,size=256m "$T/disk" && {job} > "$T/again.out" 2> "$T/again.err"; echo $? > "$T/again.rc"; '
        'cp -a "$T/disk/run" "$T/after"'
    )
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **JOB_ENV, "T": str(out.parent)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        environment.pop(key, None)
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script], cwd=REPO,
                   env=environment, timeout=600, check=True)  # fmt: skip
    root = out.parent

    def completed(name: str) -> subprocess.CompletedProcess:
        rc, stdout, stderr = ((root / f"{name}.{part}").read_text() for part in ("rc", "out", "err"))
        return subprocess.CompletedProcess([], int(rc), stdout, stderr)

    shutil.copytree(root / "after", out, dirs_exist_ok=True)
    return completed("first"), completed("again"), root / "stopped", root / "disk" / "run"


needs_mounts = pytest.mark.skipif(not _user_namespace_root(), reason="no unprivileged user namespaces: no tmpfs")


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["nan", pytest.param("disk-full", marks=needs_mounts)])
def test_a_stop_before_the_first_checkpoint_then_the_same_command(cause, tmp_path):
    out = tmp_path / "run"
    run = _nan_before_a_checkpoint if cause == "nan" else _disk_full_before_a_checkpoint
    first, again, stopped_copy, where = run(out)

    # The stop: exit 3, one line that says to run again (there is nothing to --resume), a summary.json that says so.
    assert first.returncode == 3, first.stderr[-3000:]
    stopped = json.loads((stopped_copy / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["resumable_from"] is None
    assert len(errors(first)) == 1 and errors(first)[0] == f"lemo_ds: error: {stopped['stop_reason']}"
    assert stopped["stop_reason"].endswith("run the same command again (it starts over from step 0)")
    if cause == "nan":
        assert stopped["stop_reason"].startswith(f"the loss is nan at step {stopped['stopped_at_step']}; stopped "
                                                 "without saving (no complete checkpoint yet); lower --lr")  # fmt: skip
    else:
        assert "No space left on device (ENOSPC)" in stopped["stop_reason"] and stopped["stopped_at_step"] == 1
        assert "free space (or pass a smaller --keep-checkpoints) and run the same" in stopped["stop_reason"]
        assert not list((stopped_copy / "checkpoints").glob("step*"))  # the failed tag gave its space back

    # The same command again: accepted, one line about the stopped run, whose files are set aside whole.
    ok(again)
    said = lines_with(again, "before its first checkpoint")
    assert len(said) == 1 and said[0].startswith(
        f"lemo_ds: the earlier run in {where} stopped at step {stopped['stopped_at_step']} ("
    ), said
    aside = list((out / "stopped_runs").iterdir())
    assert len(aside) == 1 and said[0].endswith(
        f"its metrics.jsonl and summary.json are now in {where / 'stopped_runs' / aside[0].name}"
    )
    assert snapshot(aside[0]) == {name: digest for name, digest in snapshot(stopped_copy).items()
                                  if name in ("metrics.jsonl", "summary.json")}  # fmt: skip
    done = summary(out)
    assert done["status"] == "done" and done["resumed_from_step"] is None
    assert [r["step"] for r in records(out)] == list(range(1, done["steps"] + 1))
    assert complete_tags(out) == [f"step{done['steps']}"]


# ---- rows 5 and 6: the README's Trainer snippet ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_snippet(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trainer") / "out"
    reports = tmp_path_factory.mktemp("trainer_reports")
    result = run_deepspeed(REPO / "tests" / "dist" / "trainer_snippet.py", str(out), ranks=1, timeout=400,
                           env={**JOB_ENV, REPORT_DIR_ENV: str(reports)})  # fmt: skip
    return out, result, reports


@pytest.mark.slow
def test_the_trainer_snippet_takes_the_shipped_config_as_given(trainer_snippet):
    out, result, reports = trainer_snippet
    ok(result)
    assert "mismatch" not in result.stdout + result.stderr
    report = json.loads((reports / "rank0.json").read_text())
    # The Trainer filled the config's "auto" values from its own arguments (tests/dist/trainer_snippet.py).
    assert report["optimizer"] == {"lr": 5e-5, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01,
                                   "torch_adam": True}  # fmt: skip
    assert report["scheduler"]["warmup_max_lr"] == 5e-5 and report["scheduler"]["warmup_num_steps"] == 1
    assert report["micro_batch"] == 2 and report["gradient_clipping"] == 0.5
    logs = [entry for entry in report["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    assert all(entry["keep_ratio_layer2"] == 0.5 for entry in logs)  # enable() read the config's "lemo" section


@pytest.mark.slow
def test_a_trainer_checkpoint_loads_with_from_pretrained(trainer_snippet):
    import torch
    from transformers import AutoModelForCausalLM

    out, result, _ = trainer_snippet
    ok(result)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()  # gathered on save: stage3_gather_16bit_weights_on_model_save
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM" and not any(info.values()), info
    ids = torch.randint(0, 128, (1, 64))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


# ---- row 7: DeepSpeed's own output -----------------------------------------------------------------------------


def _own_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Every line the job printed, the progress bar's redraws split apart."""
    return [line for line in re.split(r"[\r\n]+", result.stdout + result.stderr) if line.strip()]


@pytest.mark.slow
def test_deepspeed_output_goes_to_a_log_and_a_first_start_says_why(tmp_path):
    # A fresh extensions folder: this start compiles DeepSpeed's CPU all-reduce op, as a first start on a machine does.
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    out = tmp_path / "out"
    result = ok(train_single("--seq-len", "128", "--max-steps", "1", "--no-save", "--output-dir", str(out), env=env,
                             timeout=600))  # fmt: skip
    lines = _own_lines(result)
    assert all(line.startswith(("lemo_ds: ", "train: ")) for line in lines), lines  # lemo_ds's lines and its bar
    assert lines_with(result, "compiling") == [
        "lemo_ds: compiling DeepSpeed's shared-memory all-reduce for CPU ranks, once (about a minute; later starts "
        f"reuse it from {tmp_path / 'extensions' / 'deepspeed_shm_comm'})"
    ]
    log = (out / "deepspeed.log").read_text()
    assert "[rank 0] DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in log
    assert "[rank 0] [" in log and "[WARNING]" in log  # DeepSpeed's logger, kept

    # --verbose: DeepSpeed's lines print as DeepSpeed prints them; the op is built now, so no word about it.
    verbose_out = tmp_path / "verbose"
    verbose = ok(train_single("--seq-len", "128", "--max-steps", "1", "--no-save", "--verbose", "--output-dir",
                              str(verbose_out), env=env))  # fmt: skip
    assert "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in verbose.stdout
    assert re.search(r"^\[[-0-9 :,]+\] \[WARNING\] \[", verbose.stdout, re.MULTILINE), verbose.stdout
    assert not lines_with(verbose, "compiling") and not (verbose_out / "deepspeed.log").exists()


# ---- row 8: --help ----------------------------------------------------------------------------------------------


def test_help_shows_the_defaults():
    result = subprocess.run([sys.executable, str(TRAIN), "--help"], cwd=REPO, text=True, capture_output=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split("options:", 1)[1].split())  # the options, not the usage; unwrapped
    defaults = {"--seq-len SEQ_LEN": "1024", "--max-steps MAX_STEPS": "20", "--output-dir OUTPUT_DIR": "outputs/run",
                "--lora-r LORA_R": "8", "--seed SEED": "0"}  # fmt: skip
    for flag, default in defaults.items():
        help_text = text.split(flag, 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in help_text, (flag, help_text)
