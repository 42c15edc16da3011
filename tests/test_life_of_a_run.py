"""The whole life of a run through the real entry points: prepare, block jobs under the `deepspeed`
launcher (one of them data-parallel over 2 gloo processes), the baseline, merge, generate; and a job
killed with SIGKILL that resumes with exactly the losses of an uninterrupted one."""

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DEEPSPEED, deepspeed_block, fault_env, tiny_config_dict
from helpers import run_cli as run

from dbscale.train.distributed import free_port
from dbscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow
PY = sys.executable


@pytest.fixture(scope="module")
def config_file(speeches, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict([str(p) for p in speeches[:12]])))
    return path


def train_losses(job_dir: Path) -> dict[int, float]:
    """Per-step training loss; for steps logged twice (replayed after a resume) the later one wins."""
    return {e["step"]: e["loss"] for e in read_metrics(job_dir / "metrics.jsonl") if e["event"] == "train"}


def test_whole_life_of_a_run(config_file, tmp_path):
    r = tmp_path / "run"
    run([PY, "tools/prepare.py", "--config", str(config_file), "--run", str(r)])

    # block 0: two data-parallel processes under the deepspeed launcher (ZeRO-2 over gloo)
    run(deepspeed_block(r, 0, num_gpus=2))
    start = next(e for e in read_metrics(r / "blocks/0/metrics.jsonl") if e["event"] == "start")
    assert start["world_size"] == 2

    # merge refuses while block 1 is missing, naming it and the command that trains it
    p = run([PY, "tools/merge_blocks.py", "--run", str(r)], expect=2)
    assert "block 1: no checkpoint" in p.stderr and "--block 1" in p.stderr and "Traceback" not in p.stderr
    assert not (r / "merged").exists()

    run(deepspeed_block(r, 1))
    run([DEEPSPEED, "--master_port", str(free_port()), "launchers/train_e2e.py", "--run", str(r)])
    for job in ("blocks/0", "blocks/1", "e2e"):
        events = read_metrics(r / job / "metrics.jsonl")
        train = [e for e in events if e["event"] == "train"]
        assert [e["step"] for e in train] == list(range(1, 7))
        assert all(e["tokens_per_s"] > 0 and e["peak_mem_bytes"] > 0 and e["lr"] > 0 for e in train)
        assert events[-1]["event"] == "end" and "val_ce" in events[-1]
        assert (r / job / "latest").read_text() == "global_step6"
        assert list((r / job / "tensorboard").glob("events.out.tfevents.*"))

    run([PY, "tools/merge_blocks.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r), "--e2e"])

    # the merged weights are exactly each block's consolidated ZeRO checkpoint
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    merged = load_file(str(r / "merged/model.safetensors"))
    for b in (0, 1):
        ref = get_fp32_state_dict_from_zero_checkpoint(str(r / f"blocks/{b}"), tag="global_step6")
        for k, v in ref.items():
            assert torch.equal(merged[f"blocks.{b}.{k}"], v), k
    manifest = json.loads((r / "merged/manifest.json").read_text())
    assert manifest["kind"] == "blocks" and manifest["sources"]["1"]["step"] == 6

    for model in ("merged", "e2e/merged"):
        p = run(
            [
                PY,
                "tools/generate.py",
                "--model",
                str(r / model),
                "--prompt",
                "The Congress",
                "--max-new-tokens",
                "5",
                "--format",
                "jsonl",
                "--heldout",
                str(r),
                "--heldout-windows",
                "4",
            ]
        )
        lines = [json.loads(line) for line in p.stdout.splitlines()]
        assert lines[0]["prompt"] == "The Congress" and 1 <= lines[0]["new_tokens"] <= 5
        ce = lines[1]["ce"] if model == "e2e/merged" else lines[1]["first_step_ce"]  # a chain's last step: one-hot
        assert lines[1]["tokens"] == 4 * 32 and 0 < ce < 20

    p = run(
        [PY, "tools/generate.py", "--model", str(r / "merged"), "--prompt", "word " * 40, "--max-new-tokens", "5"],
        expect=2,
    )
    assert "fills the context of 32 tokens" in p.stderr and "at most 31 tokens" in p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1  # one line, no progress bar around it
    p = run(
        [PY, "tools/generate.py", "--model", str(r / "merged"), "--prompt", "word " * 3, "--max-new-tokens", "30"],
        expect=2,
    )
    assert "exceeds the context of 32 tokens" in p.stderr and "lower --max-new-tokens to" in p.stderr
    p = run([PY, "tools/generate.py", "--model", str(r / "merged"), "--prompt", "a", "--temperature", "-1"], expect=2)
    assert "--temperature must be >= 0" in p.stderr

    p = run([PY, "tools/status.py", "--run", str(r), "--json"])
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [row["state"] for row in rows] == ["done"] * 3


def test_killed_job_resumes_with_identical_losses(config_file, tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    for r in (ref, crashed):
        run([PY, "tools/prepare.py", "--config", str(config_file), "--run", str(r)])
    overrides = ["--set", "train.steps=10", "--set", "train.save_every=4"]
    run([PY, "launchers/train_block.py", "--run", str(ref), "--block", "1", *overrides])

    p = run(
        [PY, "launchers/train_block.py", "--run", str(crashed), "--block", "1", *overrides],
        expect=None,
        env=fault_env(DBSCALE_TEST_KILL_AFTER_STEP="6"),
    )
    assert p.returncode == -signal.SIGKILL
    assert (crashed / "blocks/1/latest").read_text() == "global_step4"
    run([PY, "launchers/train_block.py", "--run", str(crashed), "--block", "1", *overrides])

    a, b = train_losses(ref / "blocks/1"), train_losses(crashed / "blocks/1")
    assert sorted(a) == list(range(1, 11)) and a == b  # bit-identical, steps 5-6 replayed


def test_checkpoint_from_another_run_is_refused(config_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for r in (a, b):
        run([PY, "tools/prepare.py", "--config", str(config_file), "--run", str(r)])
    run([PY, "launchers/train_block.py", "--run", str(a), "--block", "0", "--set", "train.steps=3"])
    p = run([PY, "tools/status.py", "--run", str(a), "--json"])
    row = json.loads(p.stdout.splitlines()[0])  # the job's own target (3), not the run's (6)
    assert (row["state"], row["step"], row["steps"], row["checkpoint_step"]) == ("done", 3, 3, 3)
    p = run([PY, "tools/merge_blocks.py", "--run", str(a)], expect=2)
    assert "block 0 is unfinished" in p.stderr and "step 3 of 6" in p.stderr and "--allow-unfinished" in p.stderr
    shutil.copytree(a / "blocks/0", b / "blocks/0")
    p = run([PY, "launchers/train_block.py", "--run", str(b), "--block", "0"], expect=2)
    assert "belongs to run" in p.stderr and "Traceback" not in p.stderr
    p = run([PY, "tools/merge_blocks.py", "--run", str(b), "--allow-unfinished"], expect=2)
    assert "belongs to run" in p.stderr

    # a truncated checkpoint file with no older one: a clear error naming the file, nothing retrained over
    shutil.rmtree(b / "blocks/0")
    model_file = a / "blocks/0/global_step3/mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    p = run([PY, "launchers/train_block.py", "--run", str(a), "--block", "0", "--set", "train.steps=4"], expect=2)
    assert "mp_rank_00_model_states.pt" in p.stderr and "truncated" in p.stderr
    assert (a / "blocks/0/global_step3").is_dir()
