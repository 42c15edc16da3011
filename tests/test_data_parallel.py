"""Data parallelism inside a block job: for ZeRO stages 1, 2 and 3, two gloo processes under the deepspeed
launcher (one micro-batch each) match one process accumulating two micro-batches: the same per-step
losses and, after merging, the same weights."""

import sys

import pytest
import torch
import yaml
from conftest import deepspeed_block, tiny_config_dict
from conftest import run_cli as run

from dbscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_equal_one_rank_accumulating(speeches, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    train = {"steps": 4, "micro_batch": 2, "val_every": 0, "save_every": 4, "zero_stage": stage}
    runs = {}
    for name, grad_accum in (("dp2", 1), ("ga2", 2)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(
            yaml.safe_dump(tiny_config_dict([str(p) for p in speeches[:12]], train={**train, "grad_accum": grad_accum}))
        )
        runs[name] = tmp_path / name
        run([sys.executable, "tools/prepare.py", "--config", str(cfg), "--run", str(runs[name])])
    run(deepspeed_block(runs["dp2"], 1, num_gpus=2))
    run([sys.executable, "launchers/train_block.py", "--run", str(runs["ga2"]), "--block", "1"])

    losses = {
        n: [e["loss"] for e in read_metrics(r / "blocks/1/metrics.jsonl") if e["event"] == "train"]
        for n, r in runs.items()
    }
    assert len(losses["dp2"]) == 4 and losses["dp2"] == pytest.approx(losses["ga2"], rel=1e-4)
    starts = {
        n: next(e for e in read_metrics(r / "blocks/1/metrics.jsonl") if e["event"] == "start") for n, r in runs.items()
    }
    assert (starts["dp2"]["world_size"], starts["ga2"]["world_size"]) == (2, 1)
    a = get_fp32_state_dict_from_zero_checkpoint(str(runs["dp2"] / "blocks/1"), tag="global_step4")
    b = get_fp32_state_dict_from_zero_checkpoint(str(runs["ga2"] / "blocks/1"), tag="global_step4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    if stage == 2:  # DeepSpeed cannot re-shard a ZeRO checkpoint: resuming on another rank count is refused
        p = run(
            [
                sys.executable,
                "launchers/train_block.py",
                "--run",
                str(runs["dp2"]),
                "--block",
                "1",
                "--set",
                "train.steps=6",
            ],
            expect=2,
        )
        assert "saved with 2 process(es)" in p.stderr and "relaunch with 2 process(es)" in p.stderr
        assert "Traceback" not in p.stderr
