"""The run directory: prepare, re-prepare, refuse a run of another config, verify hashes, dry run."""

import json

import pytest
import yaml

from dbscale.create_run import prepare_run
from dbscale.errors import RunError
from dbscale.inspect import dry_run_report
from dbscale.run import CONFIG, MANIFEST, TOKENIZER, open_run


@pytest.fixture
def prepared(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    return cfg, prepare_run(cfg, tmp_path / "run", log=lambda *a: None)


def test_prepare_writes_the_contract(prepared):
    cfg, run = prepared
    m = run.manifest
    for rel in (CONFIG, MANIFEST, TOKENIZER, "target_embedding.safetensors"):
        assert (run.root / rel).is_file()
    assert m["num_blocks"] == 2 and m["layers_per_block"] == [1, 1] and m["vocab_size"] == 512
    assert [round(s, 4) for s in m["partition"]["sigma_boundaries"]] == [0.002, 0.3012, 80.0]
    assert m["data"]["train"] and m["data"]["val"] and m["data"]["dtype"] == "uint16"
    table = run.load_target_embedding()
    assert tuple(table.shape) == (512, 32)
    assert open_run(run.root).config == cfg
    assert not list(run.root.parent.glob(".run.preparing-*"))


def test_prepare_again_is_a_verified_no_op(prepared, tmp_path):
    cfg, run = prepared
    again = prepare_run(cfg, run.root, log=lambda *a: None)
    assert again.run_id == run.run_id


def test_prepare_refuses_a_run_of_another_config(prepared, tiny_cfg):
    _, run = prepared
    before = (run.root / MANIFEST).read_bytes()
    other = tiny_cfg(train={"lr": 5e-4}, model={"d_model": 64, "n_heads": 2})
    with pytest.raises(RunError) as info:
        prepare_run(other, run.root, log=lambda *a: None)
    msg = str(info.value)
    assert "another config" in msg and "train.lr" in msg and "model.d_model" in msg and "new --run" in msg
    assert (run.root / MANIFEST).read_bytes() == before


def test_prepare_refuses_a_foreign_directory(tiny_cfg, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty"):
        prepare_run(tiny_cfg(), tmp_path / "busy", log=lambda *a: None)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("rel", [TOKENIZER, "target_embedding.safetensors", CONFIG])
def test_a_changed_run_file_is_named(prepared, rel):
    _, run = prepared
    path = run.root / rel
    if rel == CONFIG:
        data = yaml.safe_load(path.read_text())
        data["train"]["lr"] = 0.5
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(RunError, match=path.name):
        open_run(run.root)


def test_open_run_errors(tmp_path, prepared):
    with pytest.raises(RunError, match="no such run directory"):
        open_run(tmp_path / "nowhere")
    _, run = prepared
    manifest = json.loads((run.root / MANIFEST).read_text())
    manifest["format_version"] = 99
    (run.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="format_version 99"):
        open_run(run.root)


def test_dry_run_report(tiny_cfg):
    report = dry_run_report(tiny_cfg())
    assert report["layers_per_block"] == [1, 1]
    assert report["parameters"]["e2e"] > 0 and len(report["parameters"]["blocks"]) == 2
    assert report["partition"]["train_intervals"][0][0] < report["partition"]["block_intervals"][0][0]


def test_a_run_prepared_before_a_field_existed_keeps_its_behaviour(prepared, tiny_cfg):
    """A run whose config.yaml predates diffusion.prior_loss (an earlier dbscale wrote no such key) opens with
    the value that run trained with (0: no prior term, config.ADDED_FIELDS), not the new default; preparing it
    again with today's default names the difference and changes nothing."""
    from dbscale.config import ADDED_FIELDS
    from dbscale.files import atomic_write_json, sha256_file

    cfg, run = prepared
    assert cfg.diffusion.prior_loss == 1.0 and ADDED_FIELDS[("diffusion", "prior_loss")] == 0.0
    data = yaml.safe_load((run.root / CONFIG).read_text())
    del data["diffusion"]["prior_loss"]
    (run.root / CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = json.loads((run.root / MANIFEST).read_text())
    manifest["config_sha256"] = sha256_file(run.root / CONFIG)
    atomic_write_json(run.root / MANIFEST, manifest)
    old = open_run(run.root)
    assert old.config.diffusion.prior_loss == 0.0
    assert old.config.model == cfg.model and old.config.train == cfg.train
    before = (run.root / MANIFEST).read_bytes()
    with pytest.raises(RunError, match=r"diffusion.prior_loss: 0.0 -> 1.0"):
        prepare_run(cfg, run.root, log=lambda *a: None)
    assert (run.root / MANIFEST).read_bytes() == before
    same = tiny_cfg(diffusion={"prior_loss": 0.0})
    assert prepare_run(same, run.root, log=lambda *a: None).run_id == run.run_id
