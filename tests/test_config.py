"""lowbit.config: shipped YAMLs load, keys split among the sections, overrides are typed, errors are clear."""

from __future__ import annotations

import dataclasses

import pytest

from lowbit.config import (
    Config,
    TrainConfig,
    config_dir,
    from_flat,
    list_configs,
    load_config,
    parse_overrides,
    resolve_config_path,
)
from lowbit.data import DataConfig
from lowbit.model import PRESETS, ModelConfig, num_params

SHIPPED = ("tiny", "small", "mixtral-8x7b", "llama4-scout")
# tiny.yaml: head_dim 32 so that every GEMM dimension is a multiple of mxfp4's RHT block (64)
YAML_DEVIATIONS: dict[str, dict] = {}


def test_shipped_configs_are_listed_with_a_description():
    listed = list_configs()
    assert set(SHIPPED) <= set(listed)
    for name in SHIPPED:
        assert listed[name], f"configs/{name}.yaml needs a first-line '# description'"


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_loads_and_matches_the_model_preset(name):
    config = load_config(name)
    assert isinstance(config, Config) and config.name == name
    assert isinstance(config.model, ModelConfig)
    assert isinstance(config.data, DataConfig)
    assert isinstance(config.train, TrainConfig)
    preset = {**PRESETS[name], **YAML_DEVIATIONS.get(name, {})}
    for key, value in preset.items():
        assert getattr(config.model, key) == value, f"{name}.yaml {key} differs from lowbit.model.PRESETS"


def test_small_is_about_100m_parameters():
    assert 80e6 < num_params(load_config("small").model) < 130e6


def test_keys_go_to_every_section_that_declares_them():
    config = load_config("tiny", ["emb_dim=96", "learning_rate=0.01", "global_batch_size=4"])
    assert config.model.emb_dim == 96
    assert config.train.learning_rate == 0.01
    assert config.data.global_batch_size == 4
    field_names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    shared = field_names(ModelConfig) & field_names(DataConfig)
    for key in shared:  # e.g. max_target_length: model and data must agree
        assert getattr(config.model, key) == getattr(config.data, key)


def test_flat_round_trip():
    config = load_config("tiny", ["num_experts=8", "steps=7"])
    again = from_flat(config.to_flat(), name=config.name)
    assert again == config


def test_overrides_are_typed_like_yaml_scalars():
    assert parse_overrides(["steps=12", "learning_rate=1e-3", "attention_impl=null", "dtype=float32"]) == {
        "steps": 12, "learning_rate": "1e-3", "attention_impl": None, "dtype": "float32"}
    config = load_config("tiny", ["steps=12", "learning_rate=1e-3", "norm_topk_prob=false"])
    assert config.train.steps == 12
    assert config.train.learning_rate == pytest.approx(1e-3) and isinstance(config.train.learning_rate, float)
    assert config.model.norm_topk_prob is False


def test_int_given_for_a_float_field_becomes_float():
    assert load_config("tiny", ["learning_rate=1"]).train.learning_rate == 1.0


def test_numeric_text_for_a_string_field_is_kept_as_text():
    assert load_config("tiny", ["compilation_cache_dir=2024"]).train.compilation_cache_dir == "2024"


@pytest.mark.parametrize("item, message", [
    ("learning_rate=abc", "learning_rate expects float, got 'abc'"),
    ("steps=1.5", "steps expects int, got 1.5"),
    ("steps=true", "steps expects int, got True"),
    ("norm_topk_prob=3", "norm_topk_prob expects bool, got 3"),
])
def test_bad_values_name_the_key_and_the_type(item, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [item])


def test_unknown_key_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        load_config("tiny", ["learning_rat=1e-3"])
    with pytest.raises(ValueError, match=r"unknown config key 'num_expert'.*num_experts"):
        from_flat({"num_expert": 3})


def test_malformed_override_says_how_to_write_it():
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["learning_rate"])


def test_validation_errors_of_the_sections_surface():
    with pytest.raises(ValueError, match="TrainConfig.steps must be > 0"):
        load_config("tiny", ["steps=0"])
    with pytest.raises(ValueError, match="mesh axes"):
        load_config("tiny", ["ici_data=-1", "ici_fsdp=-1"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        load_config("tiny", ["num_kv_heads=3"])


def test_config_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# mine\nemb_dim: 32\nsteps: 3\n")
    config = load_config(str(path))
    assert config.name == "mine" and config.model.emb_dim == 32 and config.train.steps == 3
    assert resolve_config_path("tiny") == config_dir() / "tiny.yaml"
    with pytest.raises(ValueError, match=r"unknown config 'tinyy'.*tiny"):
        load_config("tinyy")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="flat mapping"):
        load_config(str(path))
