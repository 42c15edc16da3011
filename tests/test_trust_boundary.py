"""The trust boundary: no file planted in a run can run code, whatever reads the run; and the faults a user meets
(a full disk, a stray shard, an unfinished calibration, a busy port) end in one clear line with nothing lost."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, events

from dbscale.create_run import prepare_run
from dbscale.errors import CheckpointError, RunError
from dbscale.files import sha256_file
from dbscale.merge import merge_run
from dbscale.run import open_run, started_blocks
from dbscale.train import checkpoint as ckpt
from dbscale.train.lock import LOCK

# Every name DeepSpeed's loaders glob in a tag: zero_to_fp32's '*_model_states.pt' / '*_optim_states.pt', the
# engine's 'mp_rank_*_model_states.pt' and 'zero_pp_rank_*_mp_rank_*_optim_states.pt', bf16 optimizer shards.
PLANTED_NAMES = (
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "mp_rank_01_model_states.pt",
    "zero_pp_rank_1_mp_rank_00_model_states.pt",
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "extra_model_states.pt",
    "extra_optim_states.pt",
)


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker_path):
        self.marker_path = str(marker_path)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker_path}",))


def quiet(*args):
    pass


def plant(tag_dir, marks_dir, names=PLANTED_NAMES) -> list:
    marks = []
    for name in names:
        mark = marks_dir / f"ran-{tag_dir.parent.name}-{name}"
        torch.save({"module": Payload(mark), "optimizer_state_dict": Payload(mark)}, tag_dir / name)
        marks.append(mark)
    return marks


@pytest.fixture
def finished_run(process_group, tiny_cfg, tmp_path):
    from dbscale.train.trainer import Trainer

    cfg = tiny_cfg(train={"steps": 2, "save_every": 2, "val_every": 0})
    run = prepare_run(cfg, tmp_path / "run", log=quiet)
    for job in (0, 1, None):
        Trainer(run, job, 0, 1).train()
    merge_run(run.root, log=quiet)
    merge_run(run.root, e2e=True, log=quiet)
    return run


def cli(*args, expect=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert p.returncode == expect, f"{args}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p


def one_clear_line(p) -> str:
    """The refusal is one 'dbscale: error:' line, with no traceback."""
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dbscale: error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_planted_pickle_runs_in_no_reader_of_the_run(finished_run, tmp_path):
    run = finished_run
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    tags = {job: run.job_dir(job) / "global_step2" for job in (0, None)}
    listed = {job: json.loads((tag / ckpt.MARKER).read_text())["files"] for job, tag in tags.items()}
    marks = plant(tags[0], marks_dir) + plant(tags[None], marks_dir)
    merged_before = sha256_file(run.root / "merged/model.safetensors")
    r = str(run.root)

    for args in (
        ["tools/merge_blocks.py", "--run", r],
        ["tools/merge_blocks.py", "--run", r, "--e2e"],
        ["launchers/train_block.py", "--run", r, "--block", "0", "--set", "train.steps=4"],
        ["launchers/train_e2e.py", "--run", r, "--set", "train.steps=4"],
    ):
        line = one_clear_line(cli(*args, expect=2))
        assert "refused:" in line and "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in line, line
        assert "Fix: delete it" in line and "Nothing was loaded" in line

    launched = cli("launchers/launch_blocks.py", "--run", r, "--local", "--blocks", "0", expect=1)
    assert "checkpoint refused" in launched.stdout and "not one the job wrote" in launched.stdout, launched.stdout
    status = cli("tools/status.py", "--run", r, expect=0)
    table = status.stdout.splitlines()
    assert "checkpoint refused" in next(ln for ln in table if ln.startswith("block 0"))
    assert "done" in next(ln for ln in table if ln.startswith("block 1"))  # the untouched block is still done
    cli("tools/report.py", "--run", r, expect=0)
    cli("tools/export_hf.py", "--model", f"{r}/e2e/merged", "--out", str(tmp_path / "hf"), expect=0)
    cli(
        "tools/evaluate.py",
        *("--model", f"{r}/merged", "--compare", f"{r}/e2e/merged", "--data", r),
        *("--num-prompts", "5", "--prompt-tokens", "8", "--new-tokens", "4"),
        expect=0,
    )
    ran = [m.name for m in marks if m.exists()]
    assert not ran, f"planted pickles ran: {ran}"

    # Nothing was lost or changed: the listed files, the merged model; without the planted files all works again.
    for job, tag in tags.items():
        for name, rec in listed[job].items():
            assert sha256_file(tag / name) == rec["sha256"]
        for name in PLANTED_NAMES:
            (tag / name).unlink()
    assert sha256_file(run.root / "merged/model.safetensors") == merged_before
    merge_run(run.root, log=quiet)
    assert sha256_file(run.root / "merged/model.safetensors") == merged_before


def test_each_planted_name_alone_is_refused_by_name(tmp_path):
    from helpers import RUN, fake_tag

    for i, name in enumerate(PLANTED_NAMES):
        job = tmp_path / f"job{i}"
        tag = fake_tag(job, 5)
        for listed in tag.iterdir():  # a fake tag of other names (a replaced listed file fails its hash instead)
            if listed.name == name:
                listed.rename(tag / "mp_rank_00_model_states.pt.renamed")
                ckpt.write_marker(
                    job,
                    tag.name,
                    {"run_id": RUN, "block": 0, "step": 5},
                    ckpt.hash_files([f for f in tag.iterdir() if f.name != ckpt.MARKER]),
                )
        plant(tag, tmp_path, [name])
        with pytest.raises(CheckpointError, match=rf"{name}: refused: this file is not one the job wrote"):
            ckpt.find_resumable(job, RUN, 0)
    assert not list(tmp_path.glob("ran-*"))


def test_deepspeed_loaders_under_weights_only_refuse_a_payload_they_are_handed(finished_run, tmp_path):
    """Second line of defence: even a pickle inside the verified view (a forged marker) is loaded weights_only."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.job_dir(0), copy)
    plant(copy / "global_step2", tmp_path, ["zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    with ckpt.weights_only_loads(), pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        get_fp32_state_dict_from_zero_checkpoint(str(copy), tag="global_step2")
    assert not list(tmp_path.glob("ran-*"))
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored on exit


def test_the_verified_view_holds_the_listed_files_alone(finished_run, tmp_path):
    info = ckpt.find_resumable(finished_run.job_dir(0), finished_run.run_id, 0)
    (info.path / "stray.txt").write_text("not a checkpoint file")
    with pytest.raises(CheckpointError, match="stray.txt: refused"):
        ckpt.find_resumable(finished_run.job_dir(0), finished_run.run_id, 0)
    (info.path / "stray.txt").unlink()
    with ckpt.verified_view(info) as view:
        assert sorted(p.name for p in (view / info.tag).iterdir()) == sorted([*info.marker["files"], ckpt.MARKER])
        assert (view / "latest").read_text() == info.tag
    assert not view.exists()
    # a listed file swapped for another after verification is checked again at staging, and refused
    victim = info.path / next(iter(info.marker["files"]))
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256 mismatch"), ckpt.verified_view(info):
        pass


# ----------------------------------------------------------------------------------------------------------
# Faults a user meets: each one clear error, the lock released, nothing lost.


@pytest.mark.parametrize("failing_step", [2, 4])
def test_a_full_disk_reported_by_torchs_zip_writer_is_a_clear_error(process_group, small_run, failing_step):
    """torch's zip writer reports ENOSPC as RuntimeError('[enforce fail at inline_container.cc:...]')."""
    from dbscale.train.trainer import Trainer

    run = small_run()
    trainer = Trainer(run, 0, 0, 1)
    real_save = trainer.engine.save_checkpoint

    def full_disk(save_dir, tag=None, **kw):
        if tag == f"global_step{failing_step}":
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"PK\x03\x04 half a zip")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(save_dir, tag=tag, **kw)

    trainer.engine.save_checkpoint = full_disk
    with pytest.raises(CheckpointError, match=r"inline_container.*is intact and the job stops here.*free disk space"):
        trainer.train()
    job = run.job_dir(0)
    assert not (job / f"global_step{failing_step}").exists() and not (job / LOCK).exists()
    previous = "none" if failing_step == 2 else "global_step2"
    assert (job / "latest").read_text() == previous if failing_step == 4 else not (job / "latest").exists()
    resumed = Trainer(run, 0, 0, 1)  # space is back: the same command resumes (or starts: nothing was saved)
    assert resumed.train()["step"] == 6
    assert [e["step"] for e in events(run, 0, "start")] == [0, failing_step - 2]


def test_a_lock_that_cannot_be_written_leaves_no_lock(process_group, small_run, monkeypatch):
    import dbscale.train.lock as lock_module
    from dbscale.train.trainer import Trainer

    run = small_run()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock_module.json, "dump", no_space)
    with pytest.raises(RunError, match=r"could not write the job lock \(No space left on device\).*free disk space"):
        Trainer(run, 0, 0, 1)
    assert not (run.job_dir(0) / LOCK).exists()
    monkeypatch.undo()
    trainer = Trainer(run, 0, 0, 1)  # the rerun after freeing space just starts
    trainer.close()


def test_a_stray_shard_in_an_unfinished_tag_does_not_stop_the_resume(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run(steps=4)
    Trainer(run, 0, 0, 1).train()
    job = run.job_dir(0)
    unfinished = job / "global_step6"
    unfinished.mkdir()
    shutil.copy(job / "global_step4/mp_rank_00_model_states.pt", unfinished / "mp_rank_01_model_states.pt")
    resumed = Trainer(open_run(run.root), 0, 0, 1)
    resumed.cfg.train.steps = 6
    assert resumed.train()["step"] == 6  # resumed from step 4; the save at step 6 replaced the debris
    assert json.loads((job / "global_step6" / ckpt.MARKER).read_text())["step"] == 6
    assert "mp_rank_01_model_states.pt" not in os.listdir(job / "global_step6")


def test_zero_stage_mismatch_names_the_fix(process_group, small_run):
    from dbscale.train.trainer import Trainer

    run = small_run(steps=2)
    Trainer(run, 0, 0, 1).train()
    run.config.train.zero_stage = 3  # what --set train.zero_stage=3 does
    with pytest.raises(
        CheckpointError, match=r"stage 2.*Fix: resume at ZeRO stage 2: drop the --set train.zero_stage=3"
    ):
        Trainer(run, 0, 0, 1)
    assert not (run.job_dir(0) / LOCK).exists()


def pending_run(tiny_cfg, root):
    """A prepared run whose calibration did not happen (prepare interrupted after the shards)."""
    import yaml

    from dbscale.run import partition_record

    cfg = tiny_cfg(diffusion={"partition": "calibrated", "calibration_steps": 10})
    run = prepare_run(cfg, root, log=quiet)
    manifest = dict(run.manifest, partition=partition_record(cfg))
    manifest.pop("calibration")
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    manifest["config_sha256"] = sha256_file(run.root / "config.yaml")
    (run.root / "manifest.json").write_text(json.dumps(manifest))
    return open_run(run.root), cfg


def test_a_run_with_pending_calibration_is_reported_and_refused_cleanly(tiny_cfg, tmp_path):
    run, cfg = pending_run(tiny_cfg, tmp_path / "run")
    r = str(run.root)
    status = cli("tools/status.py", "--run", r, expect=0)
    assert "calibration pending" in status.stdout and "Fix: run tools/prepare.py again" in status.stdout
    cli("tools/report.py", "--run", r, expect=0)
    launched = cli("launchers/launch_blocks.py", "--run", r, "--local", expect=2)
    line = one_clear_line(launched)
    assert "still to be calibrated" in line and "nothing was started" in line and "prepare.py again" in line
    assert not (run.root / "blocks").exists() or not list((run.root / "blocks").rglob("launch.log"))
    # a block directory that holds only a launch log (a job refused at start) has not started
    (run.job_dir(0)).mkdir(parents=True, exist_ok=True)
    (run.job_dir(0) / "launch.log").write_text("dbscale: error: ... still to be calibrated\n")
    assert started_blocks(run) == []
    finished = prepare_run(cfg, run.root, log=quiet)
    assert "pending" not in finished.manifest["partition"]


def test_status_shows_a_damaged_checkpoint_as_damaged(process_group, small_run):
    from dbscale.status import format_table, run_status
    from dbscale.train.trainer import Trainer

    run = small_run(steps=2)
    Trainer(run, 0, 0, 1).train()
    assert run_status(run.root)[0]["state"] == "done"
    shard = run.job_dir(0) / "global_step2/mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    row = run_status(run.root)[0]
    assert row["state"] == "checkpoint damaged" and row["checkpoint"] is None
    assert "truncated or replaced" in format_table([row])


def test_local_launches_take_free_ports(tiny_cfg, tmp_path):
    import socket

    from dbscale.launch import DEFAULT_HOSTFILE_PORT_BASE, plan

    run = prepare_run(tiny_cfg(), tmp_path / "run", log=quiet)
    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", DEFAULT_HOSTFILE_PORT_BASE))
        except OSError:
            pass  # already taken by someone else: just as good for this test
        busy.listen()
        launches = plan(run, [0, 1], None, None, None, None, e2e=True)
        ports = [launch.port for launch in launches]
        assert len(set(ports)) == 3 and DEFAULT_HOSTFILE_PORT_BASE not in ports
        for launch in launches:
            assert launch.command[launch.command.index("--master_port") + 1] == str(launch.port)
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", launch.port))  # free now: nothing else holds it
    fixed = plan(run, [0, 1], None, None, 31000, None)
    assert [launch.port for launch in fixed] == [31000, 31001]  # an explicit base is honoured
