"""A real multi-node run on one machine: two network namespaces joined by a veth pair act as two hosts, each
with its own sshd; DeepSpeed's default pdsh launcher trains one block across both (1 process each), then
launch_blocks.py trains two blocks at the same time, one per host.

Needs root, `ip netns`, sshd and pdsh (CI installs openssh-server and pdsh from Debian); skips with the
reason otherwise. Everything it creates (namespaces, veth pair, keys, sshd processes) is removed at the end,
and it only talks to the two addresses it assigned."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, tiny_config_dict

from dbscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow
SUBNET = "10.231.77"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool, package in (("ip", "iproute2"), ("/usr/sbin/sshd", "openssh-server"), ("pdsh", "pdsh")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package})"
    probe = f"dbs_probe{os.getpid()}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "network namespaces are not permitted here (ip netns add failed)"
    sh("ip", "netns", "del", probe, check=False)
    return None


@pytest.fixture
def two_hosts():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    names = [f"dbs{tag}a", f"dbs{tag}b"]
    addrs = [f"{SUBNET}.1", f"{SUBNET}.2"]
    work = Path(tempfile.mkdtemp(prefix="dbscale-hosts-"))
    os.chmod(work, 0o700)
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{names[0]}v", "type", "veth", "peer", "name", f"{names[1]}v")
        for ns, addr in zip(names, addrs, strict=True):
            sh("ip", "link", "set", f"{ns}v", "netns", ns)
            run_in = ["ip", "netns", "exec", ns]
            sh(*run_in, "ip", "link", "set", f"{ns}v", "name", "dbs0")  # one name on both: GLOO_SOCKET_IFNAME
            sh(*run_in, "ip", "addr", "add", f"{addr}/24", "dev", "dbs0")
            sh(*run_in, "ip", "link", "set", "dbs0", "up")
            sh(*run_in, "ip", "link", "set", "lo", "up")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "client_key"))
        shutil.copy(work / "client_key.pub", work / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        for i, (ns, addr) in enumerate(zip(names, addrs, strict=True)):
            conf = work / f"sshd{i}.conf"
            conf.write_text(
                f"ListenAddress {addr}\nPort 22\nHostKey {work / 'host_key'}\nPidFile {work / f'sshd{i}.pid'}\n"
                f"AuthorizedKeysFile {work / 'authorized_keys'}\nPermitRootLogin yes\nPasswordAuthentication no\n"
                "StrictModes no\nUsePAM no\n"
            )
            sh("ip", "netns", "exec", ns, "/usr/sbin/sshd", "-f", str(conf), "-E", str(work / f"sshd{i}.log"))
        # ssh (called by DeepSpeed's check and by pdsh) finds its config through a wrapper first on PATH, so
        # nothing in the user's ~/.ssh is touched.
        (work / "ssh_config").write_text(
            f"Host {SUBNET}.*\n  IdentityFile {work / 'client_key'}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  User root\n"
        )
        (work / "bin").mkdir()
        wrapper = work / "bin" / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {work / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        (work / "home").mkdir()
        # what DeepSpeed's runner exports to every node (its .deepspeed_env in HOME)
        (work / "home" / ".deepspeed_env").write_text(
            "DS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME=dbs0\nOMP_NUM_THREADS=1\nPYTHONWARNINGS=ignore\n"
        )
        env = {**os.environ, "HOME": str(work / "home"), "PATH": f"{work / 'bin'}:{os.environ['PATH']}"}
        env.update(DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
        deadline = time.time() + 20
        while True:  # both sshd up
            probes = [
                subprocess.run(
                    ["ip", "netns", "exec", names[0], "ssh", a, "true"], env=env, capture_output=True, timeout=30
                )
                for a in addrs
            ]
            if all(p.returncode == 0 for p in probes) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert all(p.returncode == 0 for p in probes), [p.stderr for p in probes]
        yield {"names": names, "addrs": addrs, "work": work, "env": env}
    finally:
        for i in range(2):
            pid = work / f"sshd{i}.pid"
            if pid.is_file():
                subprocess.run(["kill", pid.read_text().strip()], capture_output=True)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_a_block_across_two_hosts_and_two_blocks_on_two_hosts(two_hosts, speeches, tmp_path):
    h = two_hosts
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict([str(p) for p in speeches[:12]])))
    r = tmp_path / "run"
    subprocess.run(
        [sys.executable, "tools/prepare.py", "--config", str(cfg), "--run", str(r)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{a} slots=1\n" for a in h["addrs"]))
    in_host0 = ["ip", "netns", "exec", h["names"][0]]

    # 1. one block across both hosts through DeepSpeed's default (pdsh) multi-node launcher
    ds = str(Path(sys.executable).parent / "deepspeed")
    cmd = [*in_host0, ds, "--hostfile", str(hosts), "--master_addr", h["addrs"][0], "--master_port", "29777"]
    p = subprocess.run(
        [*cmd, "launchers/train_block.py", "--run", str(r), "--block", "0"],
        cwd=ROOT,
        env=h["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "pdsh" in out and all(f"{a}: " in out for a in h["addrs"])  # both nodes ran a rank
    start = next(e for e in read_metrics(r / "blocks/0/metrics.jsonl") if e["event"] == "start")
    assert start["world_size"] == 2 and (r / "blocks/0/latest").read_text() == "global_step6"

    # 2. launch_blocks.py: two blocks at the same time, block b on host b
    for job in ("blocks/0", "blocks/1"):
        shutil.rmtree(r / job, ignore_errors=True)
    p = subprocess.run(
        [
            *in_host0,
            sys.executable,
            "launchers/launch_blocks.py",
            "--run",
            str(r),
            "--hostfile",
            str(hosts),
            "--nodes-per-block",
            "1",
            "--set",
            "train.steps=200",
            "--set",
            "train.save_every=200",
        ],
        cwd=ROOT,
        env=h["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("job ") :]
    assert table.count("done") == 2 and table.count("global_step200") == 2
    for b, addr in enumerate(h["addrs"]):
        log = (r / f"blocks/{b}/launch.log").read_text()
        # pdsh prefixes each line with the host it came from: block b's rank ran on host b
        assert f"hosts {addr}, master port" in log and f"{addr}: [block {b}] step 200/200" in log
        assert (r / f"blocks/{b}/hostfile").read_text() == f"{addr} slots=1\n"
    spans = []
    for b in range(2):
        events = read_metrics(r / f"blocks/{b}/metrics.jsonl")
        spans.append((events[0]["time"], events[-1]["time"]))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # the two jobs overlapped in time
