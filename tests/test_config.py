"""The "lemo" config section: defaults, validation errors that name the key, resolution against a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemo_ds.config import (
    LEMO_ARTIFACT_RULE,
    LEMO_ARTIFACT_SELECTION,
    config_reference_markdown,
    parse_lemo_config,
    split_ds_config,
)
from lemo_ds.errors import LemoConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_recommended_rule_and_the_artifact_rule_is_one_dict_away():
    config = parse_lemo_config({})
    assert (config.block_size, config.keep_ratio, config.always_keep_blocks, config.min_blocks) == (64, 0.6, [0], 1)
    assert not config.apply_in_eval
    # The README's recommended rule (benchmarks/results/granularity-20261207): whole layers, the predictor, nested
    # choices in windows of 8 blocks, the loss on the processed positions; 32-layer Llama: layers 16..31 sparse.
    assert (config.eliminate, config.scorer, config.nested_selection, config.selection_window, config.loss_tokens) == (
        "layer", "predictor", True, 8, "processed")  # fmt: skip
    assert [i for i, r in enumerate(config.layer_keep_ratios(32)) if r < 1.0] == list(range(16, 32))
    # ds_configs/zero3_lemo.json, the main job's config, spells out the same rule.
    main_job, _ = split_ds_config(json.loads((REPO / "ds_configs" / "zero3_lemo.json").read_text()))
    rule = ("keep_ratio", "eliminate", "scorer", "nested_selection", "selection_window", "loss_tokens", "dense_layers")
    assert [getattr(main_job, key) for key in rule] == [getattr(config, key) for key in rule]
    # LeMo's artifact: layers 0..15 and 31 dense, 16..30 sparse at 0.4 (the artifact keeps layers 15..30 sparse).
    artifact = parse_lemo_config(dict(LEMO_ARTIFACT_RULE))
    assert [i for i, r in enumerate(artifact.layer_keep_ratios(32)) if r < 1.0] == list(range(16, 31))
    assert (artifact.scorer, artifact.nested_selection, artifact.loss_tokens) == ("oracle", False, "all")
    assert LEMO_ARTIFACT_RULE == {**LEMO_ARTIFACT_SELECTION, "scorer": "oracle"} and artifact.keep_ratio == 0.4


def test_the_processed_loss_default_gives_way_to_a_section_without_the_segment_loss():
    # loss_tokens "processed" is lemo_ds's segment loss: left to its default it is "all" without that loss; set, it
    # is refused there.
    assert parse_lemo_config({"memory": {"segment_loss": False}}).loss_tokens == "all"
    with pytest.raises(LemoConfigError, match='loss_tokens "processed" needs memory.segment_loss true'):
        parse_lemo_config({"memory": {"segment_loss": False}, "loss_tokens": "processed"})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"keep_ratios": 0.4}, r"lemo\.keep_ratios: unknown key; allowed keys are: .*keep_ratio"),
        (
            {"schedule": {"warmup": 3}},
            r"lemo\.schedule\.warmup: unknown key; allowed keys are: dense_steps, ramp_steps",
        ),
        ({"keep_ratio": 0.0}, r"lemo\.keep_ratio: .*out of range; allowed values are in \(0, 1\]"),
        ({"keep_ratio": [0.5, 1.2]}, r"lemo\.keep_ratio: .*1\.2 is out of range"),
        ({"keep_ratio": []}, r"lemo\.keep_ratio: an empty list"),
        ({"block_size": 0}, r"lemo\.block_size: .*greater than or equal to 1"),
        ({"min_blocks": 0}, r"lemo\.min_blocks"),
        ({"scorer": "attention"}, r"lemo\.scorer: Input should be 'oracle', 'random', 'norm' or 'predictor'"),
        ({"kernels": "cuda"}, r"lemo\.kernels: Input should be 'auto', 'triton' or 'torch'"),
        ({"keep_ratio": [1.0, 0.4], "dense_layers": [1]}, r"dense_layers: layer 1 is dense but keep_ratio\[1\] = 0.4"),
        # strict types: a value of the wrong JSON type is refused, not converted
        ({"keep_ratio": "0.4"}, r"lemo\.keep_ratio"),
        ({"block_size": "64"}, r"lemo\.block_size: Input should be a valid integer"),
        ({"block_size": 64.0}, r"lemo\.block_size: Input should be a valid integer"),
        ({"enabled": 1}, r"lemo\.enabled: Input should be a valid boolean"),
        ({"memory": {"segment_loss": "false"}}, r"lemo\.memory\.segment_loss: Input should be a valid boolean"),
        ({"predictor": {"lr": "0.01"}}, r"lemo\.predictor\.lr: Input should be a valid number"),
        ({"memory": {"pinned_buffers": "registered"}}, r"lemo\.memory: .*pinned_buffers \"registered\" only applies "
         r"to offloaded checkpoints; set offload_checkpoints true"),
        ({"memory": {"pinned_buffers": "exact"}}, r"lemo\.memory\.pinned_buffers: Input should be 'power_of_two' or "
         r"'registered'"),
        ({"memory": {"resident_checkpoints": 2}}, r"lemo\.memory: .*resident_checkpoints 2 only applies to offloaded "
         r"checkpoints"),
        ({"memory": {"offload_checkpoints": True, "resident_checkpoints": -1}}, r"lemo\.memory\.resident_checkpoints"),
        ({"memory": {"layers_per_stored_input": 2}}, r"lemo\.memory: .*layers_per_stored_input 2 only applies to "
         r"offloaded checkpoints"),
        ({"memory": {"offload_checkpoints": True, "layers_per_stored_input": 0}},
         r"lemo\.memory\.layers_per_stored_input: Input should be greater than or equal to 1"),
    ],
)
def test_bad_sections_name_the_key_and_what_is_allowed(section, message):
    with pytest.raises(LemoConfigError, match=message):
        parse_lemo_config(section)


def test_section_must_be_an_object():
    with pytest.raises(LemoConfigError, match='"lemo" must be a JSON object'):
        parse_lemo_config([0.4])


def test_per_layer_ratios_and_dense_layers_against_the_model():
    config = parse_lemo_config({"keep_ratio": [1.0, 0.5, 0.3, 1.0]})
    assert config.layer_keep_ratios(4) == [1.0, 0.5, 0.3, 1.0]
    with pytest.raises(LemoConfigError, match="4 values for a model with 6 decoder layers"):
        config.layer_keep_ratios(6)
    config = parse_lemo_config({"keep_ratio": 0.5, "dense_layers": [0, -1]})
    assert config.layer_keep_ratios(4) == [1.0, 0.5, 0.5, 1.0]
    with pytest.raises(LemoConfigError, match="layer 7 does not exist; the model has layers 0..3"):
        parse_lemo_config({"dense_layers": [7]}).layer_keep_ratios(4)
    assert parse_lemo_config({"keep_ratio": 0.5, "dense_layers": "auto"}).layer_keep_ratios(6) == [1.0] * 3 + [
        0.5
    ] * 2 + [1.0]
    assert parse_lemo_config({"keep_ratio": 0.5}).layer_keep_ratios(6) == [1.0] * 3 + [0.5] * 3
    assert parse_lemo_config({"keep_ratio": 0.5, "dense_layers": "first_half"}).layer_keep_ratios(6) == [1.0] * 3 + [
        0.5
    ] * 3
    per_layer = {"keep_ratio": [0.3, 0.5, 1.0, 0.4], "dense_layers": "first_half"}
    assert parse_lemo_config(per_layer).layer_keep_ratios(4) == [1.0, 1.0, 1.0, 0.4]


def test_split_ds_config_from_a_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "lemo": {"keep_ratio": 0.25}}))
    lemo, ds = split_ds_config(path)
    assert lemo.keep_ratio == 0.25 and ds == {"train_micro_batch_size_per_gpu": 1}
    lemo, ds = split_ds_config({"train_micro_batch_size_per_gpu": 1})
    assert lemo is None
    with pytest.raises(LemoConfigError, match="DeepSpeed config file not found"):
        split_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LemoConfigError, match="not valid JSON"):
        split_ds_config(tmp_path / "bad.json")


def test_reference_table_lists_every_key():
    table = config_reference_markdown()
    for key in ("block_size", "keep_ratio", "dense_layers", "schedule.dense_steps", "schedule.ramp_steps", "scorer"):
        assert f"| `{key}` |" in table


def test_readme_config_reference_is_up_to_date():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert config_reference_markdown() in readme, "regenerate the README table with: python -m lemo_ds.config"
