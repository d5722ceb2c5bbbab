"""lemo_ds.integrations.transformers and launch/train_hf.py: a real transformers Trainer, real DeepSpeed engines.

The launcher runs (two CPU ranks of launch/train_hf.py; one process each of launch/train.py and train_hf.py) are
module fixtures that several tests read. The in-process tests run a Trainer without DeepSpeed on a tiny model.
Every job uses a "lemo" schedule (1 dense step, then a ramp of 2 steps to keep ratio 0.4), so a controller that
did not follow the step would stay dense and fail the keep-ratio assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from launch_util import REPO, run_deepspeed
from tiny_models import VOCAB, packed_position_ids, tiny_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorWithFlattening,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import lemo_ds
from lemo_ds.hf_compat import trainer_checkpointing_arguments
from lemo_ds.integrations.transformers import LemoCallback, enable
from lemo_ds.predictors import find_predictor_scorer

TRAIN, TRAIN_HF = REPO / "launch" / "train.py", REPO / "launch" / "train_hf.py"
JOB_ENV = {"TRITON_INTERPRET": "0"}  # conftest turns the interpreter on for the kernel tests; jobs run PyTorch's path
SCHEDULE = {"dense_steps": 1, "ramp_steps": 2}
# seq 256 = 4 blocks of 64 in the sparse layers 4-7 of tiny-llama: steps 1-2 dense (controller steps 0, 1: the dense
# step, then the ramp's start), step 3 ratio 0.7 -> 3 blocks, step 4 ratio 0.4 -> 2 blocks.
KEEP_SPARSE_LAYERS = [1.0, 1.0, 0.75, 0.5]
SPARSE = (4, 5, 6, 7)  # zero3_lemo.json: dense_layers "first_half"


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    config = json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text())
    config["lemo"]["schedule"] = SCHEDULE
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # a loadable final model
    # fp32 for both jobs on every CPU: the Trainer path trains in fp32 on a CPU (TrainingArguments refuses bf16 without
    # a GPU), launch/train.py in bf16 where the CPU has it; the comparison below is of the two loops, like with like.
    config["bf16"] = {"enabled": False}
    path = tmp_path_factory.mktemp("config") / "zero3_lemo_schedule.json"
    path.write_text(json.dumps(config))
    return path


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def single(script: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update({"PYTHONUNBUFFERED": "1", **JOB_ENV})
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=environment, text=True,
                          capture_output=True, timeout=240)  # fmt: skip


# ---- two ranks: ZeRO-3 through the DeepSpeed config, Hugging Face checkpointing from TrainingArguments ----------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, ds_config) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("train_hf_2")
    result = ok(run_deepspeed(TRAIN_HF, "--deepspeed", str(ds_config), "--max-steps", "4", "--seq-len", "256",
                              "--lora-r", "0", "--grad-ckpt", "hf", "--output-dir", str(out), timeout=300,
                              env=JOB_ENV))  # fmt: skip
    return out, result.stdout


@pytest.mark.slow
def test_the_schedule_follows_the_trainers_global_step(two_ranks):
    records = metrics(two_ranks[0])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for layer in SPARSE:
        assert [r["keep_ratio_per_layer"][layer] for r in records] == KEEP_SPARSE_LAYERS
    assert all(r["keep_ratio_per_layer"][layer] == 1.0 for r in records for layer in (0, 1, 2, 3))


@pytest.mark.slow
def test_keep_ratios_reach_the_trainers_logs(two_ranks):
    """In trainer.state.log_history (metrics.jsonl is written from it) and in the logs the callbacks after
    LemoCallback receive: the Trainer's PrinterCallback (disable_tqdm) printed them."""
    out, stdout = two_ranks
    assert metrics(out)[-1]["mean_keep_ratio"] == pytest.approx((4 + 4 * 0.5) / 8)
    printed = [line for line in stdout.splitlines() if "'loss'" in line]
    assert printed and all("'keep_ratio_layer4'" in line and "'mean_keep_ratio'" in line for line in printed)


@pytest.mark.slow
def test_a_trainer_checkpoint_is_an_ordinary_model(two_ranks):
    """No remove_lemo before saving: the saved config and weights load into the plain Hugging Face class."""
    final = two_ranks[0] / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM" and lemo_ds.get_controller(model) is None
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert "lemo" not in (final / "config.json").read_text()
    ids = torch.randint(0, 256, (1, 64))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


# ---- one process: the Trainer's loss curve is launch/train.py's ------------------------------------------------


@pytest.fixture(scope="module")
def both_jobs(tmp_path_factory, ds_config) -> tuple[list[dict], list[dict]]:
    runs = []
    for script in (TRAIN, TRAIN_HF):
        out = tmp_path_factory.mktemp(script.stem)
        ok(single(script, "--deepspeed", str(ds_config), "--max-steps", "3", "--seq-len", "256", "--no-save",
                  "--output-dir", str(out)))  # fmt: skip
        runs.append(metrics(out))
    return runs[0], runs[1]


@pytest.mark.slow
def test_the_trainer_loss_curve_equals_train_py(both_jobs):
    """Same model init, LoRA init, rows, optimizer, warm-up, clipping, schedule of keep ratios: the same losses.

    One process, not two: on CPU ranks accelerate runs DeepSpeed as one process (its PartialState has no backend
    for DeepSpeed without an accelerator), so the Trainer logs rank 0's loss where launch/train.py logs the mean
    over the ranks (train_hf.py then shards the rows itself, so the training is the same; only the log differs).
    The logged learning rates are not compared: train.py logs the rate a step applies, the Trainer the rate after it.
    """
    plain, trainer = both_jobs
    assert [r["step"] for r in trainer] == [r["step"] for r in plain] == [1, 2, 3]
    assert [r["loss"] for r in trainer] == pytest.approx([r["loss"] for r in plain], rel=1e-6, abs=0)
    assert [r["keep_ratio_per_layer"] for r in trainer] == [r["keep_ratio_per_layer"] for r in plain]
    assert trainer[-1]["keep_ratio_per_layer"][4] == 0.75  # the schedule moved in both


# ---- in process: a Trainer without DeepSpeed on a tiny model ----------------------------------------------------

BLOCK = 16
SEQ = 64  # 4 blocks


class Rows(torch.utils.data.Dataset):
    def __init__(self, count: int, seq: int = SEQ) -> None:
        generator = torch.Generator().manual_seed(7)
        self.ids = torch.randint(1, VOCAB, (count, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Recorder(TrainerCallback):
    """The logs and the gradients of each optimizer step, as a reporting callback would see them."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def trainer_for(model, tmp_path, steps: int, recorder: Recorder | None = None, **arguments) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, seed=0, **arguments)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Rows(2 * steps), callbacks=[recorder] if recorder else None)


LEMO = {"keep_ratio": 0.5, "block_size": BLOCK, "scorer": "oracle"}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf-checkpointing"])
def test_checkpointing_from_training_arguments_gives_the_same_gradients(tmp_path, checkpointing):
    """Sparse layer 2 (keep 2 of 4 blocks) with and without TrainingArguments' checkpointing: the same gradients
    (the selection is a function of the layer input, recomputed identically), and the logs carry keep ratios."""
    grads = {}
    for mode in (False, checkpointing):
        recorder = Recorder()
        arguments = trainer_checkpointing_arguments(use_reentrant=False) if mode else {}
        trainer = trainer_for(tiny_model("llama"), tmp_path, steps=1, recorder=recorder, **arguments)
        calls = []
        # A submodule of the sparse layer: its hooks run again when checkpointing recomputes the layer in backward.
        trainer.model.model.layers[2].mlp.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        enable(trainer, config=LEMO)  # after the Recorder was registered: LemoCallback still goes first
        trainer.train()
        assert len(calls) == (2 if mode else 1)
        grads[mode] = recorder.grads[0]
        logged = recorder.logs[0]
        assert logged["keep_ratio_layer2"] == 0.5 and logged["keep_ratio_layer0"] == 1.0
        assert trainer.state.log_history[0]["keep_ratio_layer2"] == 0.5
    reference, checked = grads[False], grads[checkpointing]
    assert reference.keys() == checked.keys() and len(reference) > 0
    for name in reference:
        torch.testing.assert_close(checked[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_schedule_on_a_trainer_without_the_integration_is_an_error(tmp_path):
    """apply_lemo by hand and a plain Trainer (the controller never learns the step): refused right after the
    first optimizer step, instead of a model that stays dense for the whole run."""
    model = lemo_ds.apply_lemo(tiny_model("llama"), {**LEMO, "schedule": {"dense_steps": 1}})
    trainer = trainer_for(model, tmp_path, steps=3)
    with pytest.raises(lemo_ds.LemoConfigError, match=r"does not know the step.*integrations\.transformers\.enable"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_the_same_schedule_through_enable_ramps(tmp_path):
    recorder = Recorder()
    model = lemo_ds.apply_lemo(tiny_model("llama"), {**LEMO, "schedule": {"dense_steps": 1}})  # converted by hand
    trainer = enable(trainer_for(model, tmp_path, steps=2, recorder=recorder))
    assert isinstance(trainer.callback_handler.callbacks[0], LemoCallback)
    trainer.train()
    assert [logs["keep_ratio_layer2"] for logs in recorder.logs if "loss" in logs] == [1.0, 0.5]


def test_predictors_train_right_after_the_trainers_optimizer_step(tmp_path):
    """The predictor scorer calibrates on the fly (global step 0) and refreshes (global step 2) in the controller's
    step hook, which LemoCallback runs after the optimizer step: a step's refresh is in that step's log."""
    recorder = Recorder()
    predictor = {"hidden_rank": 8, "out_rank": 8, "calibration_batches": 1, "calibration_updates": 2,
                 "refresh_every": 2, "refresh_updates": 1}  # fmt: skip
    section = {**LEMO, "scorer": "predictor", "kernels": "torch", "predictor": predictor}
    model = lemo_ds.apply_lemo(tiny_model("llama", dtype=torch.float32), section)
    trainer = enable(trainer_for(model, tmp_path, steps=3, recorder=recorder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-the-fly calibration says so once
        trainer.train()
    history = find_predictor_scorer(model).trainer.history
    # the default layout of 4 layers: 2 and 3 sparse
    assert {layer: len(observations) for layer, observations in history.items()} == {2: 2, 3: 2}
    assert ["predictor_recall" in logs for logs in recorder.logs if "loss" in logs] == [False, False, True]


def test_own_loops_may_set_the_step_after_the_optimizer_step_and_must_set_it_at_all():
    for sets_step in (True, False):
        model = lemo_ds.apply_lemo(tiny_model("llama"), {**LEMO, "schedule": {"ramp_steps": 4}})
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        ids = torch.randint(1, VOCAB, (1, SEQ))
        for step in range(3):
            if step == 1 and not sets_step:
                with pytest.raises(lemo_ds.LemoConfigError, match="set_step"):
                    model(input_ids=ids, labels=ids)
                break
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            if sets_step:
                lemo_ds.get_controller(model).set_step(step + 1)


def test_without_a_step_dependent_section_a_plain_trainer_is_fine(tmp_path):
    model = lemo_ds.apply_lemo(tiny_model("llama"), LEMO)  # fixed keep ratio: nothing depends on the step
    trainer_for(model, tmp_path, steps=2).train()


def test_enable_needs_a_config_and_an_unwrapped_model(tmp_path):
    trainer = trainer_for(tiny_model("llama"), tmp_path, steps=1)
    with pytest.raises(lemo_ds.LemoConfigError, match=r"TrainingArguments\(deepspeed="):
        enable(trainer)
    assert enable(trainer, config={"lemo": {"enabled": False}}) is trainer  # dense: nothing added
    assert lemo_ds.get_controller(trainer.model) is None
    assert not any(isinstance(c, LemoCallback) for c in trainer.callback_handler.callbacks)
    trainer.model_wrapped = torch.nn.Module()
    with pytest.raises(lemo_ds.LemoConfigError, match="before trainer.train"):
        enable(trainer, config=LEMO)


def test_flattened_batches_take_the_document_aware_path():
    """DataCollatorWithFlattening packs examples into one row with position ids restarting at 0: the converted
    model derives the documents from them (evaluation, dense: each document's logits are its own forward's), and in
    training the sparse layer selects within that row."""
    model = lemo_ds.apply_lemo(tiny_model("llama"), LEMO).eval()
    lengths = [40, 24]
    generator = torch.Generator().manual_seed(3)
    features = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=generator).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening()(features)
    torch.testing.assert_close(batch["position_ids"], packed_position_ids(1, lengths))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # [1, 64, V]
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]])).logits for f in features], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
    model.train()
    controller = lemo_ds.get_controller(model)
    controller.reset_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and controller.stats()["keep_ratio_per_layer"][2] == 0.5


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig's default
def test_trl_sft_trainer_with_packing(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass) with packing: rows of several examples whose position ids restart at
    each one (the document-aware path), and the schedule by global step through enable."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w2", unk_token="w1")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 56, (8,), generator=generator).tolist()
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=generator)) for n in lengths]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                     packing=True, max_length=128)  # fmt: skip
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)  # fmt: skip
    enable(trainer, config={**LEMO, "schedule": {"dense_steps": 1}})
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) > 1  # packed examples
    trainer.train()
    keep = [entry["keep_ratio_layer2"] for entry in trainer.state.log_history if "loss" in entry]
    assert keep[0] == 1.0 and 0.45 < keep[1] < 0.6  # dense step, then about half of each example's blocks
