"""Slurm for real: a single-host cluster (munged, slurmctld and slurmd of this test, in a temporary directory, on
free ports) runs launchers/slurm/train_blocks.sbatch as a job array and train_e2e.sbatch for the baseline; a task
stopped by `scancel --signal=TERM` saves, is requeued with `scontrol requeue`, resumes from its checkpoint and
ends where an uninterrupted job ends.

Needs root and Debian's slurm-wlm and munge (.ci/run installs them); skips with the reason otherwise. The
daemons are this test's own processes and are stopped at the end whatever happens."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, tiny_config_dict

from dbscale.train.distributed import free_port
from dbscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow
PY = sys.executable


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run slurmctld, slurmd and munged"
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install slurm-wlm munge)"
    return None


@pytest.fixture
def cluster():
    """(environment for Slurm commands, work directory) of a fresh one-node cluster."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="dbscale-slurm-"))
    os.chmod(work, 0o755)  # munged wants its socket's directory reachable by all
    procs_pidfiles = [work / "munged.pid", work / "slurmctld.pid", work / "slurmd.pid"]
    try:
        (work / "state").mkdir()
        (work / "spool").mkdir()
        key = work / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        conf = work / "slurm.conf"
        conf.write_text(
            (ROOT / "launchers/slurm/example-slurm.conf")
            .read_text()
            .format(host=host, cpus=cpus, work=work, ctld_port=free_port(), slurmd_port=free_port())
        )
        env = {**os.environ, "SLURM_CONF": str(conf)}
        subprocess.run(
            ["munged", f"--key-file={key}", f"--socket={work}/munge.socket", f"--pid-file={work}/munged.pid",
             f"--log-file={work}/munged.log", f"--seed-file={work}/munge.seed"],
            check=True, env=env, timeout=30,
        )  # fmt: skip
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=30)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed"):
                break
            time.sleep(0.5)
        else:
            log = (work / "slurmctld.log").read_text()[-2000:]
            pytest.fail(f"the test cluster did not come up: {p.stdout} {p.stderr}\n{log}")
        yield env, work
    finally:
        for pidfile in reversed(procs_pidfiles):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        shutil.rmtree(work, ignore_errors=True)


def wait_for(env, job: str, timeout: float = 300) -> dict:
    """Poll until the job (or array task) has left the queue; its final state from scontrol."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
        if not p.stdout.strip():
            break
        time.sleep(1)
    else:
        raise AssertionError(f"job {job} still queued after {timeout}s")
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True).stdout
    fields = dict(kv.split("=", 1) for line in out.splitlines() for kv in line.split() if "=" in kv)
    return fields


def sbatch(env, work, *args: str) -> str:
    p = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={work}", *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def test_job_array_baseline_preemption_requeue_and_resume(cluster, speeches, tmp_path):
    env, work = cluster
    env = {**env, "PATH": f"{Path(PY).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict([str(p) for p in speeches[:12]], train={"steps": 6})))
    run = tmp_path / "run"
    subprocess.run([PY, "tools/prepare.py", "--config", str(cfg), "--run", str(run)], cwd=ROOT, check=True, env=env,
                   capture_output=True)  # fmt: skip

    # every block as one array task, the baseline as its own job; then merge and generate
    array = sbatch(env, work, "--array=0-1", "--nodes=1", "launchers/slurm/train_blocks.sbatch", str(run))
    e2e = sbatch(env, work, "--nodes=1", "launchers/slurm/train_e2e.sbatch", str(run))
    for job in (f"{array}_0", f"{array}_1", e2e):
        state = wait_for(env, job)
        assert state["JobState"] == "COMPLETED", (job, state, list(work.glob("*.out")))
    for job in ("blocks/0", "blocks/1", "e2e"):
        assert read_metrics(run / job / "metrics.jsonl")[-1]["event"] == "end"
    log = (work / f"dbscale-block-{array}_1.out").read_text()
    assert f"[slurm] block 1 of {run}: job" in log and "1 process(es) per node" in log
    subprocess.run([PY, "tools/merge_blocks.py", "--run", str(run)], cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run(
        [PY, "tools/generate.py", "--model", str(run / "merged"), "--prompt", "The", "--max-new-tokens", "4",
         "--format", "jsonl"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(out.stdout.splitlines()[0])["new_tokens"] == 4

    # preemption: SIGTERM through Slurm, a checkpoint, requeue, resume, the same end as an uninterrupted job
    long = ["--set", "train.steps=600", "--set", "train.save_every=10000", "--set", "train.log_every=1"]
    job = sbatch(env, work, "--array=0", "--nodes=1", "launchers/slurm/train_blocks.sbatch", str(run), *long)
    metrics = run / "blocks/0/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["event"] == "train" and e["step"] > 6 for e in read_metrics(metrics)):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", f"{job}_0"], env=env, check=True)
    state = wait_for(env, f"{job}_0")
    stopped = [e for e in read_metrics(metrics) if e["event"] == "stopped"]
    assert stopped and stopped[-1]["reason"] == "signal", state
    step = stopped[-1]["step"]
    assert 6 < step < 600 and (run / "blocks/0/latest").read_text() == f"global_step{step}"
    subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, check=True)
    state = wait_for(env, f"{job}_0")
    assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) >= 1, state
    starts = [e["step"] for e in read_metrics(metrics) if e["event"] == "start"]
    assert starts[-2:] == [6, step]  # the requeued task resumed from the checkpoint the signal wrote
    resumed_end = read_metrics(metrics)[-1]

    reference = tmp_path / "reference"  # the same prepared run, no job trained yet
    shutil.copytree(run, reference, ignore=shutil.ignore_patterns("blocks", "e2e", "merged"))
    for steps in (["--set", "train.steps=6"], long):  # the same history: 6 steps, then extended to 600
        subprocess.run([PY, "launchers/train_block.py", "--run", str(reference), "--block", "0", *steps], cwd=ROOT,
                       env=env, check=True, capture_output=True)  # fmt: skip
    reference_end = read_metrics(reference / "blocks/0/metrics.jsonl")[-1]
    assert resumed_end["step"] == reference_end["step"] == 600
    assert resumed_end["val_loss"] == pytest.approx(reference_end["val_loss"], rel=1e-5)
