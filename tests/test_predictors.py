"""lemo_ds.predictors: training on a planted pattern, recall, pruning, files, fingerprints (CPU, plain torch)."""

from __future__ import annotations

import math

import pytest
import torch

from lemo_ds.errors import LemoConfigError
from lemo_ds.kernels import oracle_scores
from lemo_ds.predictors import (
    OracleLabels,
    PredictorBank,
    PredictorDesign,
    PredictorTrainer,
    SelectionRule,
    check_fingerprint,
    load_predictors,
    read_metadata,
    save_predictors,
    topk_recall,
)
from lemo_ds.predictors.loss import predictor_loss
from lemo_ds.predictors.module import LayerPredictor, block_pair_allowed, distance_bucket
from lemo_ds.predictors.prune import UnitActivity, prune_predictor

H, SEQ, BLOCK, KEEP = 32, 512, 16, 0.4  # n = 32 blocks, 12 chosen by score besides the sink block


def planted_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, OracleLabels]:
    """Hidden states with a marker token in 60% of the blocks, and the oracle's labels of a layer whose queries
    all look for the marker: a block holding one scores high down its whole column, so the oracle keeps the
    earliest 12 marked blocks (about 19 are marked; fewer than 12 in 1% of samples, where the rest is noise). One
    token in 16 carries the signal, which a block mean dilutes 16-fold; the predictor must find it and learn that
    earlier blocks have longer columns."""
    x = torch.randn(batch, SEQ, H, generator=gen)  # [b, s, h]
    x[..., 0] *= 0.1  # the marker's channel is quiet elsewhere
    n = SEQ // BLOCK
    marked = torch.rand(batch, n, generator=gen) < 0.6  # [b, n]: rarely fewer than the 12 chosen
    where = torch.randint(0, BLOCK, (batch, n), generator=gen) + torch.arange(n) * BLOCK  # [b, n]
    marker = torch.zeros(H)
    marker[0] = 10.0
    for b in range(batch):
        x[b, where[b][marked[b]]] += marker
    mix = torch.randn(H, 16, generator=gen) * 0.05
    query = (torch.ones(batch, SEQ, 16) + x @ mix)[:, None]  # [b, 1, s, d]: every query wants the marker
    key = (x[..., :1] * torch.ones(16) + x @ mix)[:, None]  # [b, 1, s, d]: large only on marker tokens
    scores, tiles = oracle_scores(query, key, BLOCK, return_tiles=True, backend="torch")
    return x, OracleLabels(scores, tiles, None)


def test_training_lowers_the_loss_and_recalls_a_planted_pattern():
    gen = torch.Generator().manual_seed(0)
    bank = PredictorBank(H, PredictorDesign(hidden_rank=16, out_rank=16), layers=[3])
    trainer = PredictorTrainer(bank, SelectionRule(BLOCK, {3: KEEP}), lr=1e-2)
    held_out = [planted_batch(8, gen) for _ in range(2)]

    def recall() -> float:
        with torch.no_grad():
            return torch.cat([topk_recall(bank.get(3)(x, BLOCK)[1], labels.scores, SEQ, BLOCK, KEEP)
                              for x, labels in held_out]).mean().item()  # fmt: skip

    before = recall()
    observations = [trainer.observe(3, *planted_batch(4, gen), updates=8) for _ in range(25)]
    after = recall()
    losses = [obs.loss for obs in observations]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert after >= 0.95, (before, after)
    # What the content adds over the positional prior (earlier blocks have longer columns).
    n = SEQ // BLOCK
    prior = torch.cat([topk_recall((n - torch.arange(n.__int__())).float().expand(8, -1), labels.scores, SEQ, BLOCK,
                                   KEEP) for _, labels in held_out]).mean().item()  # fmt: skip
    assert after > prior + 0.2, (prior, after)
    assert observations[-1].recall >= 0.9  # the trainer's own figure: recall on a batch before training on it


@pytest.mark.parametrize("packed", [False, True])
def test_loss_and_pair_bias_match_their_definitions_with_every_gradient(packed):
    """The training loss is the SmoothL1 mean over the allowed block pairs, and every pair's bias is its distance
    bucket's entry of dist_bias: both written here by selection and indexing, against the predictor's own forms
    (which avoid a boolean selection and an indexing backward), values and gradients."""
    gen = torch.Generator().manual_seed(3)
    n, buckets = 37, 6
    predictor = LayerPredictor(H, PredictorDesign(hidden_rank=8, out_rank=4, distance_buckets=buckets))
    with torch.no_grad():
        predictor.dist_bias.copy_(torch.randn(buckets, generator=gen))
        predictor.wq.copy_(torch.randn(predictor.wq.shape, generator=gen))
    starts = torch.tensor([0, 0, 0, 3, 3, 3, 3, 7] + [8] * (n - 8)) if packed else None  # documents' first blocks
    lo_block = starts[None].repeat(2, 1) if packed else None  # [b, n]
    x = torch.randn(2, n * BLOCK - 5, H, generator=gen)  # [b, s, h], a partial last block
    tiles, scores = predictor(x, BLOCK, lo_block)
    allowed = block_pair_allowed(lo_block, n, 2, x.device)  # [b, n, n]
    oracle = torch.rand(2, n, n, generator=gen) * allowed
    labels = OracleLabels(oracle.sum(1), oracle, lo_block)
    loss, _ = predictor_loss(tiles, scores, labels, choose=5, forced=[0])
    target = oracle / ((oracle * allowed).sum((1, 2)) / allowed.sum((1, 2)))[:, None, None]
    expected = torch.nn.functional.smooth_l1_loss(tiles[allowed], target[allowed])
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, list(predictor.parameters()), retain_graph=True)
    expected_grads = torch.autograd.grad(expected, list(predictor.parameters()))
    for name, got, want in zip([name for name, _ in predictor.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(got, want, msg=name)

    idx = torch.arange(n)
    indexed = predictor.dist_bias[distance_bucket((idx[:, None] - idx[None, :]).clamp_min(0), buckets)]  # [n, n]
    upstream = torch.randn(n, n, generator=gen)
    torch.testing.assert_close(predictor.pair_bias(n, x.device), indexed)
    got = torch.autograd.grad((predictor.pair_bias(n, x.device) * upstream).sum(), predictor.dist_bias)[0]
    want = torch.autograd.grad((indexed * upstream).sum(), predictor.dist_bias)[0]
    torch.testing.assert_close(got, want)


def test_recall_counts_only_the_blocks_chosen_by_score():
    oracle = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1]])  # n = 8, B = 16, s = 128
    # keep 0.5: k = 4 with the sink block forced, so 3 are chosen by score: blocks 1, 2, 3.
    assert topk_recall(oracle, oracle, 128, 16, 0.5).item() == 1.0
    predicted = torch.tensor([[0.0, 5.0, 4.0, 0.0, 2.0, 0.0, 0.0, 0.0]])  # chooses 1, 2, 4 (sink ignored)
    assert topk_recall(predicted, oracle, 128, 16, 0.5).item() == pytest.approx(2 / 3)
    # A partial tail block is forced too, on both sides: at s = 120 block 7 is partial, so only 2 blocks are chosen
    # by score (1 and 2 on both sides), and block 4, which only the prediction would add, no longer counts.
    assert topk_recall(predicted, oracle, 120, 16, 0.5).item() == 1.0


def test_distance_buckets_are_log_spaced_and_exact():
    d = torch.arange(0, 1000)
    expected = torch.floor(2 * torch.log2(d.double() + 1)).clamp(max=19).long()
    assert torch.equal(distance_bucket(d, 20), expected)


def test_pruning_drops_inactive_units_without_changing_predictions():
    torch.manual_seed(0)
    predictor = LayerPredictor(H, PredictorDesign(hidden_rank=12, out_rank=16), seed=1)
    with torch.no_grad():  # units 0..4 of each side can never fire: a large negative bias
        predictor.b1q[:5] = -1e3
        predictor.b1k[:5] = -1e3
    x = torch.randn(2, 256, H)
    activity = UnitActivity(predictor)
    activity.add(predictor, x, BLOCK)
    pruned = prune_predictor(predictor, activity, min_activity=0.01)
    assert pruned.hidden_units == (7, 7)
    assert pruned.parameter_count() < predictor.parameter_count()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, BLOCK)[1], predictor(x, BLOCK)[1])


FINGERPRINT = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": H, "num_attention_heads": 4,
               "num_key_value_heads": 2, "block_size": BLOCK}  # fmt: skip


def test_save_load_round_trip(tmp_path):
    bank = PredictorBank(H, PredictorDesign(hidden_rank=8, out_rank=16, distance_buckets=12), layers=[2, 3], seed=4)
    activity = UnitActivity(bank.get(3))
    with torch.no_grad():
        bank.get(3).b1k[:2] = -1e3
    activity.add(bank.get(3), torch.randn(1, 128, H), BLOCK)
    bank.set(3, prune_predictor(bank.get(3), activity))  # ranks differ per layer and side after pruning
    path = tmp_path / "p.safetensors"
    save_predictors(path, bank, FINGERPRINT, {"recall": {"2": 0.97, "3": 0.95}})
    loaded, meta = load_predictors(path)
    assert loaded.layers == [2, 3] and loaded.design == bank.design
    assert meta["fingerprint"] == FINGERPRINT and meta["info"]["recall"] == {"2": 0.97, "3": 0.95}
    assert meta["layers"]["3"]["hidden_k"] == 6 and meta["layers"]["2"]["hidden_q"] == 8
    x = torch.randn(2, 200, H)
    for layer in (2, 3):
        for (name, a), (_, b) in zip(bank.get(layer).named_parameters(), loaded.get(layer).named_parameters()):
            assert torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(bank.get(layer)(x, BLOCK)[1], loaded.get(layer)(x, BLOCK)[1])
    assert read_metadata(path)["design"] == {"hidden_rank": 8, "out_rank": 16, "distance_buckets": 12}


def test_fingerprint_mismatch_and_bad_files_are_clear_errors(tmp_path):
    other = {**FINGERPRINT, "hidden_size": 64, "num_hidden_layers": 8}
    with pytest.raises(LemoConfigError, match=r"num_hidden_layers 4 \(file\) vs 8 \(model\); hidden_size 32 \(file\)"):
        check_fingerprint(FINGERPRINT, other, "p.safetensors")
    check_fingerprint(FINGERPRINT, dict(FINGERPRINT), "p.safetensors")
    with pytest.raises(LemoConfigError, match="no such file"):
        load_predictors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LemoConfigError, match="is not a safetensors file"):
        load_predictors(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LemoConfigError, match="holds no lemo_ds predictors"):
        load_predictors(tmp_path / "plain.safetensors")


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = PredictorBank(H, PredictorDesign(), layers=[5], seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    b = PredictorBank(H, PredictorDesign(), layers=[5], seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert math.isclose(a.get(5).w1q.std().item(), H**-0.5, rel_tol=0.2)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"scorer": "oracle", "predictor_path": "p.safetensors"}, r'predictor_path is set but scorer is "oracle"'),
        ({"scorer": "predictor", "predictor": {"calibration_batches": 0}}, r"nothing would train the predictors"),
        ({"predictor": {"hidden_rank": 0}}, r"lemo\.predictor\.hidden_rank: .*greater than or equal to 1"),
        ({"predictor": {"lr": 0}}, r"lemo\.predictor\.lr: .*greater than 0"),
        ({"predictor": {"rank": 8}}, r"lemo\.predictor\.rank: unknown key; allowed keys are: calibration_batches"),
    ],
)
def test_predictor_config_errors_name_the_key(section, message):
    from lemo_ds.config import parse_lemo_config

    with pytest.raises(LemoConfigError, match=message):
        parse_lemo_config(section)
    assert parse_lemo_config({"scorer": "predictor", "predictor": {"calibration_batches": 0, "refresh_every": 5}})
