"""Config loading: shipped recipes, overrides, and an actionable error for every kind of bad input."""

import dataclasses
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


def test_a_family_owns_its_config_section_and_old_flat_keys_still_load(capsys):
    """Huginn's fields live in model.huginn (dbscale/models/huginn.py HuginnConfig): the old flat layout of a
    user's config loads into it with a note naming the new place; a run's record in the old layout (every
    family's fields flat, as dbscale wrote config.yaml before) loads silently; another family's fields or
    section are an error naming the owner."""
    from dbscale.families import frozen_config_from_dict
    from dbscale.models.huginn import HuginnConfig

    new = config_from_dict({"model": {"family": "huginn", "n_layers": 8, "huginn": {"bptt_steps": 3}}})
    assert new.model.family_config == HuginnConfig(bptt_steps=3)
    assert new.to_dict()["model"]["huginn"]["bptt_steps"] == 3 and "bptt_steps" not in new.to_dict()["model"]
    assert config_from_dict(new.to_dict()) == new  # the round trip of config.yaml
    capsys.readouterr()
    old = config_from_dict({"model": {"family": "huginn", "n_layers": 8, "bptt_steps": 3}}, where="old.yaml")
    assert old == new
    assert "old.yaml: model.bptt_steps is read as model.huginn.bptt_steps; move it there" in capsys.readouterr().err
    flat_record = {**Config().to_dict()}
    flat_record["model"] = {**flat_record["model"], **dataclasses.asdict(HuginnConfig())}  # a llama run of before
    record = frozen_config_from_dict(flat_record, where="runs/old/config.yaml")
    assert record == config_from_dict(Config().to_dict()) and record.model.family_config is None
    with pytest.raises(ConfigError, match=r"model\.bptt_steps is read by the 'huginn' family only"):
        config_from_dict({"model": {"bptt_steps": 3}})
    with pytest.raises(ConfigError, match=r"model\.huginn is the 'huginn' family's section, but model\.family is"):
        config_from_dict({"model": {"huginn": {"bptt_steps": 3}}})
    with pytest.raises(
        ConfigError, match=r"section 'model\.huginn': unknown key 'bptt_step'. Did you mean 'bptt_steps'"
    ):
        config_from_dict({"model": {"family": "huginn", "n_layers": 8, "huginn": {"bptt_step": 3}}})
    with pytest.raises(ConfigError, match=r"model\.huginn\.bptt_steps: must be >= 1"):
        config_from_dict({"model": {"family": "huginn", "n_layers": 8, "huginn": {"bptt_steps": 0}}})


def test_host_mmap_threshold_is_validated_and_applied_on_linux():
    import sys

    from dbscale.train.host_memory import set_mmap_threshold

    with pytest.raises(ConfigError, match=r"train.host_mmap_threshold: must be >= 0 bytes"):
        config_from_dict({"train": {"host_mmap_threshold": -1}})
    assert config_from_dict({}).train.host_mmap_threshold == 65536
    assert set_mmap_threshold(0) is False  # 0: glibc's default is left alone
    if sys.platform.startswith("linux"):
        assert set_mmap_threshold(65536) is True
