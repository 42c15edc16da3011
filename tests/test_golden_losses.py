"""Golden losses: the first steps of every job of a small run of each family, against stored values.

Any change to initialisation, data order, noise draws, the model or the loss moves these numbers. When a change
is meant to (a new default, a fixed bug), regenerate the file and say so in the commit:

    DBSCALE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_losses.py

The values are the training loss per step as metrics.jsonl logs it (the trainer's own loop through DeepSpeed),
and a checksum of each job's final weights.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from dbscale.create_run import prepare_run
from dbscale.train.metrics import read_metrics

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"
UPDATE = os.environ.get("DBSCALE_UPDATE_GOLDEN") == "1"

FAMILIES = {
    "llama": {},
    "masked": {
        "model": {"family": "masked", "n_layers": 2},
        "data": {"tokenizer_type": "char", "vocab_size": 27, "normalize": "text8"},
    },
    "huginn": {
        "model": {
            "family": "huginn",
            "n_layers": 4,
            "huginn": {"prelude_layers": 1, "core_layers": 2, "coda_layers": 1, "mean_recurrence": 3, "bptt_steps": 2},
        },
        "diffusion": {"num_blocks": 1, "gamma": 0.0, "sample_steps": 3},
    },
}


def weights_checksum(module: torch.nn.Module) -> float:
    return float(sum(p.double().abs().sum().item() for p in module.parameters()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_first_losses_of_every_job_match_the_golden_file(process_group, tiny_cfg, tmp_path, family):
    from dbscale.train.trainer import Trainer

    sections = {k: dict(v) for k, v in FAMILIES[family].items()}
    sections.setdefault("train", {}).update(steps=5, save_every=100, val_every=0, log_every=1)
    run = prepare_run(tiny_cfg(**sections), tmp_path / "run", log=lambda *a: None)
    measured = {}
    for job in [*range(run.num_blocks), None]:
        trainer = Trainer(run, job, 0, 1)
        trainer.train()
        events = read_metrics(run.job_dir(job) / "metrics.jsonl")
        name = "e2e" if job is None else f"block {job}"
        measured[name] = {
            "losses": [e["loss"] for e in events if e["event"] == "train"],
            "weights_abs_sum": weights_checksum(trainer.engine.module),
        }
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if UPDATE:
        golden[family] = measured
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden losses rewritten")
    assert family in golden, f"no golden losses for '{family}': run with DBSCALE_UPDATE_GOLDEN=1 once"
    assert measured.keys() == golden[family].keys()
    for job, values in golden[family].items():
        # CPU kernels may sum in another order on another machine: agreement to 1e-4 is "unchanged"
        assert measured[job]["losses"] == pytest.approx(values["losses"], rel=1e-4), job
        assert measured[job]["weights_abs_sum"] == pytest.approx(values["weights_abs_sum"], rel=1e-4), job
