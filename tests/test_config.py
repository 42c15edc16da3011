"""Config loading: shipped recipes, overrides, and an actionable error for every kind of bad input."""

from pathlib import Path

import pytest

from dbscale import families
from dbscale.config import Config, apply_overrides
from dbscale.errors import ConfigError
from dbscale.families import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert sum(families.layer_allocation(cfg)) == cfg.model.n_layers


def test_paper_recipe_values():
    cfg = load_config(ROOT / "configs/llama_lm1b_b4.yaml")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.seq_len) == (12, 768, 12, 256)
    assert (cfg.diffusion.num_blocks, cfg.diffusion.gamma, families.layer_allocation(cfg)) == (4, 0.1, [3, 3, 3, 3])
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.data.vocab_size) == (3e-4, 2500, 32000)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {n_layers: 4, d_model: 32, n_heads: 2}\ndiffusion: {num_blocks: 2}\n")
    cfg = load_config(
        path, ["train.lr=3e-4", "diffusion.layers_per_block=[1, 3]", "train.activation_checkpointing=true"]
    )
    assert cfg.train.lr == 3e-4 and families.layer_allocation(cfg) == [1, 3] and cfg.train.activation_checkpointing


def errors_for(data: dict, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(data, list(overrides)), where="my.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    "data, overrides, expected",
    [
        ({"trian": {}}, [], ["my.yaml", "unknown key 'trian'", "Did you mean 'train'"]),
        ({"train": {"learning_rate": 1}}, [], ["section 'train'", "'learning_rate'"]),
        ({"train": {"lr": "fast"}}, [], ["train.lr", "must be a number"]),
        ({"train": {"steps": 1.5}}, [], ["train.steps", "integer"]),
        ({"model": {"n_layers": float("inf")}}, [], ["model.n_layers", "integer"]),  # found by the fuzzer
        ({"train": {"lr": float("nan")}}, [], ["train.lr", "finite"]),
        (
            {"model": {"n_layers": 10}, "diffusion": {"num_blocks": 4}},
            [],
            ["diffusion.num_blocks", "does not divide", "layers_per_block"],
        ),
        (
            {"model": {"n_layers": 12}, "diffusion": {"num_blocks": 3, "layers_per_block": [3, 6, 4]}},
            [],
            ["layers_per_block", "sums to 13"],
        ),
        ({"diffusion": {"num_blocks": 2, "layers_per_block": [12]}}, [], ["layers_per_block", "1 entries"]),
        ({"diffusion": {"partition": "quantile"}}, [], ["diffusion.partition", "equiprobable"]),
        ({"model": {"d_model": 100, "n_heads": 3}}, [], ["model.n_heads", "not divisible"]),
        ({"train": {"zero_stage": 4}}, [], ["train.zero_stage"]),
        ({"data": {"source": "files"}}, [], ["data.paths"]),
        ({}, ["train.lr"], ["section.key=value"]),
        ({}, ["optim.lr=1"], ["unknown key 'optim'"]),
        ({"model": []}, [], ["section 'model' must be a mapping"]),
    ],
)
def test_bad_config_names_the_field(data, overrides, expected):
    message = errors_for(data, *overrides)
    for part in expected:
        assert part in message, message


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {n_layers: 4\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict():
    cfg = load_config(ROOT / "configs/llama_tiny.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert Config() == config_from_dict({})
