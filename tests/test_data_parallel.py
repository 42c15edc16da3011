"""Data parallelism inside a block job, and resuming it on another process count, for ZeRO stages 1, 2 and 3.

Two gloo processes under the deepspeed launcher (one micro-batch each) match one process accumulating two
micro-batches: the same per-step losses. A job checkpointed on 2 processes resumes on 1 (and one checkpointed on
1 resumes on 2) through DeepSpeed's universal checkpoint: converted once, grad_accum scaled so the global batch
and the data stay the same, and the losses continue as those of the unchanged job."""

import json
import shutil
import sys

import pytest
import torch
import yaml
from helpers import deepspeed_block, fault_env, tiny_config_dict
from helpers import run_cli as run

from dbscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def losses_after_last_start(job_dir) -> dict[int, float]:
    events = read_metrics(job_dir / "metrics.jsonl")
    last = max(i for i, e in enumerate(events) if e["event"] == "start")
    return {e["step"]: e["loss"] for e in events[last:] if e["event"] == "train"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_equal_one_rank_accumulating_and_resume_on_the_other(speeches, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    train = {"steps": 6, "micro_batch": 2, "val_every": 0, "save_every": 4, "zero_stage": stage, "log_every": 1}
    runs = {}
    for name, grad_accum in (("ga2", 2), ("dp2", 1)):
        cfg = tmp_path / f"{name}.yaml"
        data = tiny_config_dict([str(p) for p in speeches[:12]], train={**train, "grad_accum": grad_accum})
        cfg.write_text(yaml.safe_dump(data))
        runs[name] = tmp_path / name
        run([sys.executable, "tools/prepare.py", "--config", str(cfg), "--run", str(runs[name])])
    one_rank = [sys.executable, "launchers/train_block.py", "--block", "1", "--run"]

    # the reference: one process accumulating two micro-batches, 6 steps
    run([*one_rank, str(runs["ga2"])])
    reference = losses_after_last_start(runs["ga2"] / "blocks/1")
    # two processes, one micro-batch each, killed after the checkpoint at step 4 ...
    run(deepspeed_block(runs["dp2"], 1, num_gpus=2), expect=None, env=fault_env(DBSCALE_TEST_KILL_AFTER_STEP="4"))
    dp2 = runs["dp2"] / "blocks/1"
    assert (dp2 / "latest").read_text() == "global_step4"
    assert losses_after_last_start(dp2) == pytest.approx({s: reference[s] for s in range(1, 5)}, rel=1e-4)
    # ... resumed on one process: converted to a universal checkpoint, grad_accum 2, the same steps 5 and 6
    out = run([*one_rank, str(runs["dp2"])])
    assert "converting" in out.stdout + out.stderr
    assert not (dp2 / "universal/global_step4").exists()  # pruned once a newer checkpoint (step 6) was saved
    assert losses_after_last_start(dp2) == pytest.approx({5: reference[5], 6: reference[6]}, rel=1e-4)
    event = next(e for e in read_metrics(dp2 / "metrics.jsonl") if e["event"] == "resharded")
    assert (event["from_world_size"], event["world_size"], event["grad_accum"]) == (2, 1, 2)
    a = get_fp32_state_dict_from_zero_checkpoint(str(runs["ga2"] / "blocks/1"), tag="global_step6")
    b = get_fp32_state_dict_from_zero_checkpoint(str(dp2), tag="global_step6")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

    # the other way: the reference's step-4 checkpoint resumed on two processes (grad_accum 1)
    up = tmp_path / "up"
    shutil.copytree(runs["ga2"], up)
    shutil.rmtree(up / "blocks/1/global_step6")
    (up / "blocks/1/latest").write_text("global_step4")
    run(deepspeed_block(up, 1, num_gpus=2))
    assert losses_after_last_start(up / "blocks/1") == pytest.approx({5: reference[5], 6: reference[6]}, rel=1e-4)
    start = [e for e in read_metrics(up / "blocks/1/metrics.jsonl") if e["event"] == "start"][-1]
    assert (
        start["world_size"] == 2
        and json.loads((up / "blocks/1/global_step6/dbscale.json").read_text())["grad_accum"] == 1
    )


def test_a_process_count_that_cannot_keep_the_global_batch_is_refused(speeches, tmp_path):
    """3 accumulation steps on 1 process cannot become an equal global batch on 2 processes."""
    cfg = tmp_path / "c.yaml"
    train = {"steps": 2, "micro_batch": 2, "val_every": 0, "grad_accum": 3}
    cfg.write_text(yaml.safe_dump(tiny_config_dict([str(p) for p in speeches[:12]], train=train)))
    r = tmp_path / "run"
    run([sys.executable, "tools/prepare.py", "--config", str(cfg), "--run", str(r)])
    run([sys.executable, "launchers/train_block.py", "--run", str(r), "--block", "0"])
    p = run([*deepspeed_block(r, 0, num_gpus=2), "--set", "train.steps=4"], expect=2)
    assert "divides the global batch of 3 micro-batches" in p.stderr and "Traceback" not in p.stderr
