"""The predictor scorer inside real (tiny) Hugging Face models: calibration, files, fingerprints, online refresh,
data-parallel averaging (two CPU ranks over gloo)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import tiny_model

import lemo_ds
from lemo_ds.config import LEMO_ARTIFACT_RULE
from lemo_ds.decoder_layer import is_sparse_layer
from lemo_ds.errors import LemoConfigError
from lemo_ds.predictors import calibrate, load_predictors, save_predictors
from lemo_ds.predictors.fingerprint import model_fingerprint
from lemo_ds.predictors.labels import oracle_labels
from lemo_ds.predictors.layer_inputs import for_each_layer_input
from lemo_ds.predictors.prune import UnitActivity, prune_predictor
from lemo_ds.predictors.recall import topk_recall
from lemo_ds.predictors.scorer import (
    CHECKPOINT_BANK,
    CHECKPOINT_STATE,
    PredictorScorer,
    checkpoint_saved,
    find_predictor_scorer,
)

SEQ, BLOCK = 256, 16  # 16 blocks
# LeMo's rule with the predictor: on the 4-layer tiny models layer 2 alone is sparse.
SECTION = {**LEMO_ARTIFACT_RULE, "scorer": "predictor", "block_size": BLOCK, "keep_ratio": 0.4, "kernels": "torch",
           "predictor": {"hidden_rank": 16, "out_rank": 16, "calibration_updates": 10}}  # fmt: skip


def batches(count: int, seed: int, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 97, (batch, SEQ), generator=gen)} for _ in range(count)]


def converted(section: dict | None = None, layers: int = 4, **model_kwargs):
    model = tiny_model(layers=layers, dtype=torch.float32, **model_kwargs)
    lemo_ds.apply_lemo(model, {**SECTION, **(section or {})})
    return model


def spy_on(model, layer_index: int) -> dict:
    """Record what the scorer returns at one layer, with the oracle's scores and the layer input beside it."""
    scorer = find_predictor_scorer(model)
    captured: dict = {}
    original = scorer.score

    def spy(layer, hidden, context):
        captured["scores"] = original(layer, hidden, context)
        if context.layer_index == layer_index:
            captured["oracle"] = scorer._oracle.score(layer, hidden, context)
            captured["hidden"] = hidden.clone()  # the layer writes its kept rows back into its input, in place
        return captured["scores"]

    for layer in model.model.layers:
        if is_sparse_layer(layer):
            layer._lemo.sparse.scorer.score = spy
    return captured


def test_uncalibrated_layers_calibrate_on_the_fly_with_oracle_selection():
    model = converted({"predictor": {**SECTION["predictor"], "calibration_batches": 2}})
    scorer = find_predictor_scorer(model)
    assert isinstance(scorer, PredictorScorer) and not scorer.bound
    controller = lemo_ds.get_controller(model)
    captured = spy_on(model, 2)
    ids = batches(1, seed=9)[0]
    with pytest.warns(UserWarning, match="layer 2 has no trained predictor; calibrating on the fly on its first 2"):
        model(**ids)
    for calls in (1, 2):
        torch.testing.assert_close(captured["scores"], captured["oracle"])  # the oracle selects meanwhile
        controller.set_step(calls)  # an optimizer step: the predictor trains on what the forward queued
        assert len(scorer.trainer.history[2]) == calls and scorer.trained == {2}
        if calls == 1:
            model(**ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = model(**ids, labels=ids["input_ids"]).loss  # the third micro-batch: the predictor scores it
    torch.testing.assert_close(captured["scores"], scorer.predict(2, captured["hidden"], BLOCK))
    assert not torch.allclose(captured["scores"], captured["oracle"]) or scorer.prefers_prior(2)
    loss.backward()  # the predictors are not the model's: no gradient reaches them
    assert all(p.grad is None for p in scorer.bank.parameters())
    assert not any(p is q for p in scorer.bank.parameters() for q in model.parameters())


def test_explicit_calibration_and_the_oracle_fallback_without_any():
    # No calibration at all (only an online refresh, later): the oracle scores the untrained layer.
    model = converted({"predictor": {**SECTION["predictor"], "calibration_batches": 0, "refresh_every": 10}})
    captured = spy_on(model, 2)
    with pytest.warns(UserWarning, match="layer 2 has no trained predictor yet; scoring with oracle"):
        model(**batches(1, seed=9)[0])
    torch.testing.assert_close(captured["scores"], captured["oracle"])
    recall = calibrate(model, batches(3, seed=1))
    scorer = find_predictor_scorer(model)
    assert set(recall) == {2} and 0.0 <= recall[2] <= 1.0  # layers 0, 1 dense (first half), 3 dense (last)
    assert scorer.trained == {2} and len(scorer.trainer.history[2]) == 3 and model.training  # mode restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batches(1, seed=9)[0])
    torch.testing.assert_close(captured["scores"], scorer.predict(2, captured["hidden"], BLOCK))


def test_calibrated_scorer_does_not_fall_below_the_positional_prior():
    """On a tiny random Llama (weights N(0, 0.2)) the oracle is nearly all position: the positional prior (column
    lengths) recalls ~0.95, and a dozen small calibration batches leave the predictor below it (recall ~0.85). The
    scorer notices (recall of both, measured before training on each batch) and scores with the prior."""
    model = converted({"predictor": {**SECTION["predictor"], "calibration_updates": 20}})
    calibrate(model, batches(12, seed=2))
    scorer = find_predictor_scorer(model)
    history = scorer.trainer.history[2]
    assert len(history) == 12 and all(0 <= obs.prior_recall <= 1 for obs in history)
    held_out = []
    def collect(layer, hidden, context) -> None:
        held_out.append((hidden.clone(), oracle_labels(layer, hidden, context, backend="torch").scores))

    for_each_layer_input(model, batches(4, seed=3), [2], BLOCK, collect)

    def recall(score) -> float:
        return torch.cat([topk_recall(score(h), s, SEQ, BLOCK, 0.4) for h, s in held_out]).mean().item()

    n = SEQ // BLOCK
    prior = recall(lambda h: (n - torch.arange(n)).float().expand(h.shape[0], -1))
    chosen = recall(lambda h: scorer.predict(2, h, BLOCK))
    assert chosen >= prior - 0.05, (chosen, prior, scorer.trainer.prefers_prior(2))


def test_file_round_trip_into_another_model_instance(tmp_path):
    model = converted()
    calibrate(model, batches(3, seed=4))
    scorer = find_predictor_scorer(model)
    path = tmp_path / "p.safetensors"
    meta = scorer.save(str(path), {"recall": {"2": 0.9}})
    assert meta["prior_layers"] == ([2] if scorer.prefers_prior(2) else [])
    fresh = converted({"predictor_path": str(path)}, seed=5)
    loaded = find_predictor_scorer(fresh)
    assert loaded.trained == {2}
    ids = batches(1, seed=6)[0]
    fresh(**ids, labels=ids["input_ids"]).loss.backward()  # scores with the file's predictors, no warning
    hidden = torch.randn(2, SEQ, 32)
    torch.testing.assert_close(loaded.predict(2, hidden, BLOCK), scorer.predict(2, hidden, BLOCK))
    scorer.prior_layers, scorer.trainer.history = {2}, {}  # as a file that lists layer 2 under prior_layers
    n = SEQ // BLOCK
    torch.testing.assert_close(scorer.predict(2, hidden, BLOCK), (n - torch.arange(n)).float().expand(2, -1))


def test_a_file_for_another_model_is_a_clear_error(tmp_path):
    model = converted()
    calibrate(model, batches(1, seed=4), updates=1)
    scorer = find_predictor_scorer(model)
    path = tmp_path / "p.safetensors"
    save_predictors(path, scorer.bank, scorer.fingerprint)
    other = converted({"predictor_path": str(path)}, hidden_size=48)
    with pytest.raises(LemoConfigError, match=r"trained for another model: hidden_size 32 \(file\) vs 48 \(model\)"):
        other(**batches(1, seed=0)[0])
    qwen = tiny_model("qwen2", layers=4, dtype=torch.float32)
    qwen_scorer = lemo_ds.scorers.build_scorer(lemo_ds.parse_lemo_config({**SECTION, "predictor_path": str(path)}))
    with pytest.raises(LemoConfigError, match=r"model_type 'llama' \(file\) vs 'qwen2' \(model\)"):
        qwen_scorer.bind(qwen.config)
    # The same model with more sparse layers than the file has predictors for.
    deeper = lemo_ds.scorers.build_scorer(
        lemo_ds.parse_lemo_config({**SECTION, "predictor_path": str(path), "dense_layers": [0, 3]})
    )
    with pytest.raises(LemoConfigError, match=r"has predictors for layers \[2\].*missing: \[1\]"):
        deeper.bind(model.config)
    assert model_fingerprint(model.config, BLOCK)["num_key_value_heads"] == 2


def test_online_refresh_uses_the_oracle_logs_recall_and_updates_the_predictor():
    model = converted({"predictor": {**SECTION["predictor"], "refresh_every": 2, "refresh_updates": 3}})
    calibrate(model, batches(2, seed=7))
    scorer = find_predictor_scorer(model)
    controller = lemo_ds.get_controller(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = [p.detach().clone() for p in scorer.bank.parameters()]
    steps_refreshed = []
    for step, ids in enumerate(batches(5, seed=8)):
        controller.set_step(step)
        model(**ids, labels=ids["input_ids"]).loss.backward()  # the recompute in backward must not refresh
        controller.set_step(step + 1)  # the optimizer step: the refresh queued in the forward trains here
        steps_refreshed += [entry["step"] for entry in scorer.pop_refresh_log()]
    assert steps_refreshed == [2, 4]  # step 0 never refreshes (calibrated or loaded just before)
    assert len(scorer.trainer.history[2]) == 2 + 2  # two calibration batches, two refreshes
    assert any(not torch.equal(a, b) for a, b in zip(before, scorer.bank.parameters()))


def _rank_calibrates(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = converted()
        recall = calibrate(model, batches(2, seed=100 + rank))  # every rank its own data
        scorer = find_predictor_scorer(model)
        torch.save({"params": [p.detach() for p in scorer.bank.parameters()], "recall": recall}, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_ranks_end_with_the_same_predictors(tmp_path):
    from launch_util import free_port

    mp.start_processes(_rank_calibrates, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(zero["params"], one["params"], strict=True))
    assert zero["recall"] == one["recall"]  # averaged over the ranks
    single = converted()
    calibrate(single, batches(2, seed=100))
    alone = list(find_predictor_scorer(single).bank.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(zero["params"], alone))  # rank 1's data counted


def test_loaded_file_records_what_the_table_needs(tmp_path):
    model = converted()
    calibrate(model, batches(1, seed=4), updates=1)
    scorer = find_predictor_scorer(model)
    save_predictors(tmp_path / "p.safetensors", scorer.bank, scorer.fingerprint, {"keep_ratio": {"2": 0.4}})
    bank, meta = load_predictors(tmp_path / "p.safetensors")
    assert meta["fingerprint"]["block_size"] == BLOCK and meta["layers"]["2"]["hidden_q"] == 16
    assert meta["info"]["keep_ratio"] == {"2": 0.4} and bank.layers == [2]


def test_step_hooks_run_once_each_time_the_controller_sees_the_step_move():
    model = converted({"scorer": "norm"})
    controller = lemo_ds.get_controller(model)
    seen: list[int] = []
    handle = controller.add_step_hook(seen.append)
    for step in (0, 1, 1):  # set_step: 0 is where the controller starts
        controller.set_step(step)
    optimizer_steps = [1]
    controller.follow(lambda: optimizer_steps[0])
    model(**batches(1, seed=0)[0])  # the step source says 1: no move
    optimizer_steps[0] = 3
    controller.poll_step()  # a driver that knows the optimizer step was just taken (the Trainer's on_step_end)
    model(**batches(1, seed=0)[0])
    optimizer_steps[0] = 4
    model(**batches(1, seed=0)[0])  # else the next forward of the model sees it (a DeepSpeed engine's global_steps)
    handle.remove()
    controller.set_step(5)
    assert seen == [1, 3, 4]


def _rank_trains_in_the_step_hook(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        predictor = {**SECTION["predictor"], "calibration_batches": 1, "refresh_every": 1, "refresh_updates": 2}
        model = converted({"predictor": predictor}, layers=6)  # sparse layers 3 and 4: two trainings per hook
        scorer, controller = find_predictor_scorer(model), lemo_ds.get_controller(model)
        refreshed = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the on-the-fly calibration says so once
            for step, ids in enumerate(batches(3, seed=200 + rank)):  # every rank its own data
                model(**ids, labels=ids["input_ids"]).loss.backward()
                controller.set_step(step + 1)  # the optimizer step: the queued inputs train, all-reducing
                refreshed += [(entry["step"], entry["layer"], entry["recall"]) for entry in scorer.pop_refresh_log()]
        history = {layer: len(observations) for layer, observations in scorer.trainer.history.items()}
        torch.save({"params": [p.detach() for p in scorer.bank.parameters()], "refreshed": refreshed,
                    "history": history}, f"{out}/{rank}.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_ranks_train_the_same_predictors_in_the_step_hook(tmp_path):
    """Calibration on the fly (step 0) and online refreshes (steps 1, 2) train after each optimizer step, on every
    rank its own data: the ranks keep the same predictors and log the same (averaged) recall."""
    from launch_util import free_port

    mp.start_processes(_rank_trains_in_the_step_hook, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    zero, one = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(zero["params"], one["params"], strict=True))
    assert zero["refreshed"] == one["refreshed"] and [entry[:2] for entry in zero["refreshed"]] == [
        (1, 3), (1, 4), (2, 3), (2, 4)]  # fmt: skip
    assert zero["history"] == {3: 3, 4: 3}  # one calibration batch, two refreshes


def test_calibration_on_the_fly_needs_a_loop_that_tells_the_step():
    """The predictors calibrate after the optimizer step: a loop of one's own that never calls set_step would leave
    them untrained (scored by the oracle) for the whole run, so it is refused after its first optimizer step."""
    model = converted({"predictor": {**SECTION["predictor"], "calibration_batches": 2}})
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = batches(1, seed=9)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-the-fly calibration says so once
        model(**ids, labels=ids["input_ids"]).loss.backward()
        optimizer.step()
        with pytest.raises(LemoConfigError, match="predictors calibrated on the fly.*set_step"):
            model(**ids, labels=ids["input_ids"])


# ---- checkpoints: the scorer's whole state, written and restored -----------------------------------------------

REFRESHING = {**SECTION["predictor"], "refresh_every": 1, "refresh_updates": 2}


def refreshing_model(layers: int = 6):
    """A converted model whose predictors refresh every optimizer step, with the step read from a counter, as a
    DeepSpeed engine's global_steps is (``follow``). Returns (model, scorer, the counter [steps taken])."""
    model = converted({"predictor": REFRESHING}, layers=layers)  # 6 layers: sparse layers 3 and 4
    optimizer_steps = [0]
    lemo_ds.get_controller(model).follow(lambda: optimizer_steps[0])
    return model, find_predictor_scorer(model), optimizer_steps


def train_steps(model, scorer, optimizer_steps: list[int], data: list[dict]) -> None:
    """One forward per batch, then an optimizer step the scorer sees (its step hook trains the queued refresh)."""
    for ids in data:
        model(**ids)
        optimizer_steps[0] += 1
        scorer.train_pending()


def mid_training():
    """Predictors calibrated, layer 3 pruned to one unit per side (its optimizer restarted), then two refreshes:
    weights of two shapes, Adam state, observations and a refresh schedule to carry over."""
    model, scorer, optimizer_steps = refreshing_model()
    calibrate(model, batches(2, seed=11))
    activity = UnitActivity(scorer.bank.get(3))
    activity.add(scorer.bank.get(3), torch.randn(2, SEQ, model.config.hidden_size), BLOCK)
    scorer.bank.set(3, prune_predictor(scorer.bank.get(3), activity, min_activity=1.01))  # keeps the most active
    scorer.trainer.reset_optimizer(3)
    train_steps(model, scorer, optimizer_steps, batches(3, seed=12))  # step 0 never refreshes: steps 1 and 2 do
    return model, scorer, optimizer_steps


def assert_same_adam_state(mine: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    a, b = mine.state_dict(), theirs.state_dict()
    torch.testing.assert_close(a["state"], b["state"], rtol=0, atol=0)
    assert a["param_groups"] == b["param_groups"]


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    model, scorer, optimizer_steps = mid_training()
    logged = scorer.pop_refresh_log()
    assert [(entry["step"], entry["layer"]) for entry in logged] == [(1, 3), (1, 4), (2, 3), (2, 4)]
    paths = scorer.save_checkpoint(tmp_path, {"checkpoint_step": 3})
    assert [path.name for path in paths] == [CHECKPOINT_BANK, CHECKPOINT_STATE] and checkpoint_saved(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([CHECKPOINT_BANK, CHECKPOINT_STATE])

    fresh, restored, fresh_steps = refreshing_model()
    restored.bind(fresh.config)
    restored.load_checkpoint(tmp_path)
    assert restored.bank.get(3).hidden_units == (1, 1) and restored.bank.get(4).hidden_units == (16, 16)
    for mine, theirs in zip(restored.bank.parameters(), scorer.bank.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert sorted(restored.trainer.optimizers) == sorted(scorer.trainer.optimizers) == [3, 4]
    for layer, optimizer in scorer.trainer.optimizers.items():
        assert_same_adam_state(restored.trainer.optimizers[layer], optimizer)
    assert restored.trainer.history == scorer.trainer.history and len(restored.trainer.history[3]) == 4
    assert restored.trained == scorer.trained == {3, 4} and restored.all_trained
    assert restored.prior_layers == scorer.prior_layers
    assert restored._last_refresh == scorer._last_refresh == {3: 2, 4: 2}
    hidden = torch.randn(2, SEQ, model.config.hidden_size)
    for layer in (3, 4):
        torch.testing.assert_close(restored.predict(layer, hidden, BLOCK), scorer.predict(layer, hidden, BLOCK))

    # Both go on from step 3: the same refresh recall, the same predictors and Adam state after it.
    fresh_steps[0] = optimizer_steps[0]
    data = batches(1, seed=13)
    train_steps(model, scorer, optimizer_steps, data)
    train_steps(fresh, restored, fresh_steps, data)
    assert restored.pop_refresh_log() == scorer.pop_refresh_log() != []
    for mine, theirs in zip(restored.bank.parameters(), scorer.bank.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    for layer, optimizer in scorer.trainer.optimizers.items():
        assert_same_adam_state(restored.trainer.optimizers[layer], optimizer)


def test_a_checkpoint_waits_for_the_queue_and_fits_one_model(tmp_path):
    model, scorer, optimizer_steps = refreshing_model(layers=4)  # sparse layer 2
    calibrate(model, batches(1, seed=4), updates=1)
    optimizer_steps[0] = 1
    model(**batches(1, seed=5)[0])  # step 1: the refresh is queued, to train after the optimizer step
    with pytest.raises(RuntimeError, match=r"still holds queued inputs of layers \[2\] .*after the step"):
        scorer.save_checkpoint(tmp_path)
    assert not any(tmp_path.iterdir())
    scorer.train_pending()  # the optimizer step did not move: nothing trains yet
    assert list(scorer.queue) == [2]
    optimizer_steps[0] = 2
    scorer.train_pending()
    assert not scorer.queue
    scorer.save_checkpoint(tmp_path)
    assert [entry["step"] for entry in scorer.pop_refresh_log()] == [1]  # still there for the step's metrics
    wider = converted({"predictor": REFRESHING}, hidden_size=48)
    other = find_predictor_scorer(wider)
    other.bind(wider.config)
    with pytest.raises(LemoConfigError, match=r"trained for another model: hidden_size 32 \(file\) vs 48 \(model\)"):
        other.load_checkpoint(tmp_path)


def test_moving_the_predictors_moves_their_optimizer_state():
    """The bank moves to the layer input's device on first use (CUDA in a job): Adam's moments follow, so a state
    restored from a checkpoint on the host survives the move (the meta device stands in for CUDA here)."""
    model = converted()
    calibrate(model, batches(1, seed=4), updates=1)
    scorer = find_predictor_scorer(model)
    scorer.to(torch.device("meta"))
    optimizer = scorer.trainer.optimizers[2]
    params = list(scorer.bank.get(2).parameters())
    states = [optimizer.state[param] for param in params]  # the moved parameters' (a move may replace them)
    assert len(states) == 7 and all(state["exp_avg"].device.type == "meta" for state in states)
    assert all(state["exp_avg_sq"].shape == param.shape for state, param in zip(states, params))
