"""Faults injected on purpose: non-finite losses, a full disk while saving, Ctrl-C in every long stage,
two jobs on one block, damaged run files. Each must give a clear error and lose nothing already written."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, events, fault_env

from dbscale.create_run import prepare_run
from dbscale.errors import CheckpointError, DataError, RunError
from dbscale.merge import load_merged, merge_run
from dbscale.run import MANIFEST, open_run
from dbscale.train import checkpoint as ckpt
from dbscale.train.lock import LOCK


def quiet(*args):
    pass


def nan_at(trainer, bad_steps, snapshot=None):
    """Make the training loss NaN at the given 0-based steps; optionally snapshot the weights just before."""
    family = trainer.family

    class Poisoned:
        def __getattr__(self, name):
            return getattr(family, name)

        def loss(self, job, model, window, draw, step):
            value, ce = family.loss(job, model, window, draw, step)
            if step.index in bad_steps:  # one micro-batch per step here; validation has index -1
                if snapshot is not None:
                    snapshot.update({k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()})
                return value * float("nan"), ce
            return value, ce

    trainer.family = Poisoned()


def test_nonfinite_loss_stops_before_the_weights_change(process_group, small_run):
    from dbscale.train.trainer import Trainer, TrainingError

    run = small_run()
    trainer = Trainer(run, 1, 0, 1)
    before = {}
    nan_at(trainer, {2}, before)
    with pytest.raises(TrainingError, match=r"block 1: non-finite loss \(nan\) at step 3.*last checkpoint"):
        trainer.train()
    trainer.close()
    after = trainer.engine.module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [(e["step"], e["job"]) for e in events(run, 1, "nonfinite")] == [(3, "block 1")]
    assert ckpt.find_resumable(run.job_dir(1), run.run_id, 1).step == 2


def test_nonfinite_steps_are_skipped_up_to_the_limit(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run(max_nonfinite_steps=2)
    trainer = Trainer(run, 0, 0, 1)
    nan_at(trainer, {1, 3})
    assert trainer.train()["step"] == 6
    assert [e["count"] for e in events(run, 0, "nonfinite")] == [1, 2]
    assert [e["loss"] for e in events(run, 0, "train") if e["step"] in (2, 4)] == [None, None]


def test_out_of_space_while_saving_keeps_the_previous_checkpoint(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run()
    trainer = Trainer(run, 0, 0, 1)
    real_save = trainer.engine.save_checkpoint

    def full_disk(save_dir, tag=None, **kw):
        if tag == "global_step4":
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(save_dir, tag=tag, **kw)

    trainer.engine.save_checkpoint = full_disk
    with pytest.raises(CheckpointError, match=r"No space left on device.*global_step2.*is intact.*free disk space"):
        trainer.train()
    trainer.close()
    job = run.job_dir(0)
    assert (job / "latest").read_text() == "global_step2" and not (job / "global_step4").exists()
    assert events(run, 0, "checkpoint_failed")[0]["tag"] == "global_step4"

    resumed = Trainer(run, 0, 0, 1)  # space is back: the same command resumes from step 2
    assert resumed.train()["step"] == 6
    assert [e["step"] for e in events(run, 0, "start")] == [0, 2]


def test_a_second_job_on_the_same_block_is_refused(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run()
    lock = run.job_dir(0) / LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "earlier"}))
    with pytest.raises(RunError, match=rf"block 0 of .* is already running \(host .*, pid {os.getppid()}"):
        Trainer(run, 0, 0, 1)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "earlier"}))
    with pytest.raises(RunError, match="if it died on another machine, delete"):
        Trainer(run, 0, 0, 1)

    lock.unlink()  # a job that fails while starting releases its lock at once
    shard = run.root / "data" / run.manifest["data"]["train"][0]["file"]
    content = shard.read_bytes()
    shard.write_bytes(b"")
    with pytest.raises(DataError, match="shard is 0 bytes"):
        Trainer(run, 0, 0, 1)
    assert not lock.exists()
    shard.write_bytes(content)

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    with pytest.warns(UserWarning, match="stale lock"):
        trainer = Trainer(run, 0, 0, 1)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    trainer.close()
    assert not lock.exists()


def test_ctrl_c_in_training_saves_and_resumes(small_run):
    run = small_run()
    cmd = [sys.executable, "launchers/train_block.py", "--run", str(run.root), "--block", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env(DBSCALE_TEST_INTERRUPT_AFTER_STEP="2")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stopped by signal at step 3" in p.stdout + p.stderr
    assert (run.job_dir(1) / "latest").read_text() == "global_step3"
    env.pop("DBSCALE_TEST_INTERRUPT_AFTER_STEP")
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300, check=True)
    assert events(run, 1, "end")[-1]["step"] == 6


def test_sigterm_from_outside_checkpoints_exits_cleanly_and_resumes(small_run):
    """What Slurm sends before preemption: a real SIGTERM from another process, mid-training."""
    import signal
    import time

    run = small_run(steps=400, save_every=1000, log_every=1)
    cmd = [sys.executable, "launchers/train_block.py", "--run", str(run.root), "--block", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run.job_dir(0) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and events(run, 0, "train")):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    stopped = events(run, 0, "stopped")
    assert stopped and stopped[-1]["reason"] == "signal"
    step = stopped[-1]["step"]
    assert 1 <= step < 400 and (run.job_dir(0) / "latest").read_text() == f"global_step{step}"
    resumed = subprocess.run(
        [*cmd, "--set", f"train.steps={step + 2}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert events(run, 0, "start")[-1]["step"] == step and events(run, 0, "end")[-1]["step"] == step + 2


def test_ctrl_c_while_tokenizing_keeps_the_finished_shards_for_the_resume(tiny_cfg, tmp_path, monkeypatch):
    """Ctrl-C mid-corpus leaves no run (nothing a job would take for one) but keeps the shards finished so far;
    preparing again resumes after them and gives the shards of an uninterrupted prepare."""
    from dbscale.data.shards import ShardWriter

    cfg = tiny_cfg(data={"shard_tokens": 4096, "num_workers": 1})
    whole = prepare_run(cfg, tmp_path / "whole", log=quiet)
    close, calls = ShardWriter._close, []

    def interrupted(self, position):
        calls.append(position)
        if len(calls) == 3:
            raise KeyboardInterrupt
        close(self, position)

    monkeypatch.setattr(ShardWriter, "_close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_run(cfg, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
    kept = sorted(p.name for p in (tmp_path / ".run.preparing" / "data").glob("*.bin"))
    assert kept == ["train_0000.bin", "train_0001.bin"]
    monkeypatch.setattr(ShardWriter, "_close", close)
    logs = []
    run = prepare_run(cfg, tmp_path / "run", log=logs.append)
    assert any("resuming an interrupted prepare: train after shard 2" in m for m in logs)
    assert run.manifest["data"] == whole.manifest["data"] and len(whole.manifest["data"]["train"]) > 3
    for rec in whole.manifest["data"]["train"] + whole.manifest["data"]["val"]:
        assert (run.root / "data" / rec["file"]).read_bytes() == (whole.root / "data" / rec["file"]).read_bytes()
    assert not (tmp_path / ".run.preparing").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_merge_keeps_the_previous_merge(process_group, small_run, monkeypatch, fault):
    import safetensors.torch

    from dbscale.train.trainer import Trainer

    run = small_run(steps=2)
    for block in (0, 1):
        t = Trainer(run, block, 0, 1)
        t.train()
    merged = merge_run(run.root, log=quiet)
    before = (merged / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise fault

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(type(fault)):
        merge_run(run.root, log=quiet)
    assert (merged / "model.safetensors").read_bytes() == before
    assert not [p for p in run.root.iterdir() if p.name.startswith(".merged")]
    load_merged(merged)  # still verifies and loads


def test_damaged_run_files_are_named(small_run):
    run = small_run()
    shard = run.root / "data" / run.manifest["data"]["train"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name}: sha256 differs"):
        open_run(run.root).shards("train")
    (run.root / MANIFEST).write_text((run.root / MANIFEST).read_text()[:50])
    with pytest.raises(RunError, match="manifest.json: run manifest is not valid JSON"):
        open_run(run.root)


def test_damaged_merged_model_is_named(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run(steps=2)
    for block in (0, 1):
        Trainer(run, block, 0, 1).train()
    merged = merge_run(run.root, log=quiet)
    model = merged / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(RunError, match="model.safetensors: sha256 differs"):
        load_merged(merged)
    (merged / "model.safetensors").unlink()
    with pytest.raises(RunError, match="model.safetensors: missing"):
        load_merged(merged)
