"""The family registry: a family is one object found by name, and a fourth one plugs in from outside dbscale."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, tiny_config_dict

from dbscale import families
from dbscale.config import ConfigError
from dbscale.families import config_from_dict

TESTS = Path(__file__).parent
PY = sys.executable


def test_builtin_families_are_registered_and_unknown_names_are_refused():
    assert {"huginn", "llama", "masked"} <= set(families.names())
    assert families.get("masked").space == "t" and not families.get("masked").target_table
    with pytest.raises(KeyError, match="unknown model family 'gpt'; known: huginn, llama, masked"):
        families.get("gpt")
    with pytest.raises(ConfigError, match=r"model.family: unknown model family 'gpt'.*DBSCALE_FAMILIES"):
        config_from_dict({"model": {"family": "gpt"}})


def test_no_module_outside_the_families_names_a_family_in_a_comparison():
    """Only dbscale/families/ decides by family name (the registry's promise, checked on the source)."""
    root = TESTS.parent
    offenders = []
    for folder in ("dbscale", "launchers", "tools", "bench"):
        for path in (root / folder).rglob("*.py"):
            if "families" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "family ==" in line or "family !=" in line:
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_method_package_imports_no_model():
    root = TESTS.parent / "dbscale" / "diffusion"
    for path in root.glob("*.py"):
        assert "dbscale.models" not in path.read_text(), path


@pytest.mark.slow
def test_a_fourth_family_runs_through_the_real_launchers(speeches, tmp_path):
    """tests/toy_family.py registers 'bigram' (one module and one register line) with its own config section
    (model.bigram, validated by the family); with DBSCALE_FAMILIES set, prepare, a block job, merge and
    generate run it like any built-in family."""
    env = {
        "DBSCALE_FAMILIES": "toy_family",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")])),
    }
    data = tiny_config_dict(
        [str(p) for p in speeches[:12]],
        model={"family": "bigram", "n_layers": 1, "bigram": {"prior_init_std": 0.0}},
        diffusion={"num_blocks": 1, "partition": "equiprobable"},
        train={"steps": 20, "lr": 0.05, "warmup_steps": 2, "val_every": 20, "save_every": 20},
    )
    config = tmp_path / "bigram.yaml"
    config.write_text(yaml.safe_dump(data))
    r = tmp_path / "run"
    bad = run_cli([PY, "tools/prepare.py", "--config", str(config), "--run", str(r), "--set",
                   "model.bigram.prior_init_std=-1"], expect=None, env=env)  # fmt: skip
    assert bad.returncode != 0 and "model.bigram.prior_init_std: must be >= 0, got -1" in bad.stderr
    run_cli([PY, "tools/prepare.py", "--config", str(config), "--run", str(r)], env=env)
    assert json.loads((r / "manifest.json").read_text())["family"] == "bigram"
    assert yaml.safe_load((r / "config.yaml").read_text())["model"]["bigram"] == {"prior_init_std": 0.0}
    run_cli([PY, "launchers/train_block.py", "--run", str(r), "--block", "0"], env=env)
    run_cli([PY, "launchers/train_e2e.py", "--run", str(r)], env=env)
    losses = [json.loads(x)["loss"] for x in (r / "blocks/0/metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert losses[-1] < losses[0]  # the block learns
    run_cli([PY, "tools/merge_blocks.py", "--run", str(r)], env=env)
    run_cli([PY, "tools/merge_blocks.py", "--run", str(r), "--e2e"], env=env)
    for model in ("merged", "e2e/merged"):
        out = run_cli(
            [
                PY,
                "tools/generate.py",
                "--model",
                str(r / model),
                "--prompt",
                "The",
                "--max-new-tokens",
                "6",
                "--format",
                "jsonl",
            ],
            env=env,
        )
        assert json.loads(out.stdout.splitlines()[0])["new_tokens"] == 6
    status = run_cli([PY, "tools/status.py", "--run", str(r)], env=env)
    assert status.stdout.count("done") == 2
    # without the plugin the run is refused by name, with the fix
    refused = run_cli([PY, "tools/status.py", "--run", str(r)], expect=2)
    assert "unknown model family 'bigram'" in refused.stderr and "DBSCALE_FAMILIES" in refused.stderr
