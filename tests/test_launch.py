"""launch_blocks.py: host assignment, the exact commands of a dry run, and a real local fan-out."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, tiny_config_dict

from dbscale.errors import RunError
from dbscale.launch import assign_hosts, mapped_hosts, read_hostfile
from dbscale.train.metrics import read_metrics


def test_hostfile_parsing_and_errors(tmp_path):
    h = tmp_path / "hosts"
    h.write_text("# cluster\nnode1 slots=8\nnode2 slots=4  # half node\n\nnode3\n")
    assert read_hostfile(h) == [("node1", 8), ("node2", 4), ("node3", 1)]
    h.write_text("node1 slots=eight\n")
    with pytest.raises(RunError, match=r"hosts:1: 'node1 slots=eight' is not 'HOST slots=N'"):
        read_hostfile(h)
    h.write_text("node1\nnode1\n")
    with pytest.raises(RunError, match="listed twice"):
        read_hostfile(h)


def test_assignment_is_disjoint_and_refuses_too_few_hosts():
    hosts = [(f"n{i}", 8) for i in range(6)]
    groups = assign_hosts(hosts, [0, 1, 2], 2, "hosts")
    assert groups == {0: hosts[0:2], 1: hosts[2:4], 2: hosts[4:6]}
    with pytest.raises(RunError, match="need 8 hosts, the hostfile has 6.*--blocks"):
        assign_hosts(hosts, [0, 1, 2, 3], 2, "hosts")


def test_explicit_block_to_host_map_from_the_config(tmp_path):
    from dbscale.config import ConfigError
    from dbscale.families import config_from_dict

    hosts = [("a", 8), ("b", 4), ("c", 8), ("d", 2)]
    groups = mapped_hosts(hosts, [["c"], ["a", "d"]], [0, 1, None], "hosts")
    assert groups == {0: [("c", 8)], 1: [("a", 8), ("d", 2)], None: [("b", 4)]}
    with pytest.raises(RunError, match=r"train.block_hosts\[1\] names \['x'\], which the hostfile does not list"):
        mapped_hosts(hosts, [["a"], ["x"]], [0, 1], "hosts")
    with pytest.raises(RunError, match="none is left for the end-to-end baseline"):
        mapped_hosts(hosts, [["a", "b"], ["c", "d"]], [0, None], "hosts")
    # plan() follows the map: block 0 on c, block 1 on a + d, each with its own hostfile text
    from pathlib import Path
    from types import SimpleNamespace

    from dbscale.launch import plan

    hostfile = Path(tmp_path / "hosts")
    hostfile.write_text("a slots=8\nb slots=4\nc slots=8\nd slots=2\n")
    fake = SimpleNamespace(
        root=tmp_path,
        config=SimpleNamespace(train=SimpleNamespace(block_hosts=[["c"], ["a", "d"]])),
        job_dir=lambda b: tmp_path / ("e2e" if b is None else f"blocks/{b}"),
        manifest={"partition": {"kind": "equiprobable"}},
    )
    launches = plan(fake, [0, 1], str(hostfile), None, 29600, None)
    assert [launch.hosts for launch in launches] == [["c"], ["a", "d"]]
    assert launches[1].hostfile_text == "a slots=8\nd slots=2\n"
    base = {"model": {"n_layers": 2}, "diffusion": {"num_blocks": 2}}
    with pytest.raises(ConfigError, match="host 'a' is given to block 0 and block 1"):
        config_from_dict({**base, "train": {"block_hosts": [["a"], ["a", "b"]]}})
    with pytest.raises(ConfigError, match="one non-empty list of hosts per block"):
        config_from_dict({**base, "train": {"block_hosts": [["a"]]}})


@pytest.fixture(scope="module")
def run_dir(speeches, tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    cfg = d / "c.yaml"
    data = tiny_config_dict([str(p) for p in speeches[:12]], train={"steps": 3, "val_every": 0})
    data["diffusion"]["num_blocks"] = 2
    cfg.write_text(yaml.safe_dump(data))
    subprocess.run(
        [sys.executable, "tools/prepare.py", "--config", str(cfg), "--run", str(d / "run")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return d / "run"


def test_dry_run_on_a_four_host_hostfile(run_dir, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"10.0.0.{i} slots=8\n" for i in range(1, 5)))
    p = subprocess.run(
        [
            sys.executable,
            "launchers/launch_blocks.py",
            "--run",
            str(run_dir),
            "--hostfile",
            str(hosts),
            "--e2e",
            "--nodes-per-block",
            "1",
            "--dry-run",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    jobs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [j["job"] for j in jobs] == ["block 0", "block 1", "e2e"]
    assert [j["hosts"] for j in jobs] == [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]]
    assert len({j["port"] for j in jobs}) == 3
    for j in jobs:
        cmd = j["command"]
        assert cmd[0].endswith("deepspeed") and cmd[cmd.index("--master_addr") + 1] == j["hosts"][0]
        assert cmd[cmd.index("--hostfile") + 1] == j["hostfile"] and str(run_dir) in cmd
    assert not (run_dir / "blocks/0/hostfile").exists()  # a dry run writes nothing
    p = subprocess.run(
        [sys.executable, "launchers/launch_blocks.py", "--run", str(run_dir), "--local", "--blocks", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "--blocks: [5] not in 0..1" in p.stderr


OPEN_LOGGER = """
import os, sys
_log = os.environ.get("DBSCALE_TEST_OPEN_LOG")
if _log and sys.argv and sys.argv[0].endswith("train_block.py"):
    _f = open(f"{_log}.{os.getpid()}", "w", buffering=1)
    _f.write(" ".join(sys.argv) + "\\n")
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            _f.write(os.path.abspath(os.fsdecode(args[0])) + "\\n")
    sys.addaudithook(_hook)
"""


@pytest.mark.slow
def test_two_blocks_of_two_processes_run_concurrently_and_share_nothing(run_dir, tmp_path):
    """Independence, measured: every file each training process opens is recorded (a Python audit hook), and
    each job's process group and port are read from its own logs."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(OPEN_LOGGER)
    env = {
        **os.environ,
        "PYTHONPATH": f"{hook_dir}:{os.environ.get('PYTHONPATH', '')}",
        "DBSCALE_TEST_OPEN_LOG": str(tmp_path / "opened"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "launchers/launch_blocks.py", "--run", str(run_dir), "--local", "--concurrent"]
    p = subprocess.run([*cmd, "--num-gpus", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[block 0] " in p.stdout and "[block 1] " in p.stdout
    table = p.stdout[p.stdout.index("job ") :]
    assert table.count("done") == 2 and "global_step3" in table
    ports = []
    for b in (0, 1):
        log = (run_dir / f"blocks/{b}/launch.log").read_text()
        assert "launchers/train_block.py" in log and f'"job": "block {b}"' in log
        command = log.splitlines()[0].split()
        ports.append(command[command.index("--master_port") + 1])
        start = next(e for e in read_metrics(run_dir / f"blocks/{b}/metrics.jsonl") if e["event"] == "start")
        assert start["world_size"] == 2  # each job is its own group of 2 ranks, not one group of 4
    assert ports[0] != ports[1]
    logs = sorted(tmp_path.glob("opened.*"))
    by_block = {0: [], 1: []}
    for path in logs:
        argv, *opened = path.read_text().splitlines()
        block = int(argv.split("--block")[1].split()[0])
        by_block[block].append(opened)
    assert [len(v) for v in by_block.values()] == [2, 2]  # two training processes per block
    for block, processes in by_block.items():
        other = str((run_dir / "blocks" / str(1 - block)).resolve())
        own = str((run_dir / "blocks" / str(block)).resolve())
        for opened in processes:
            assert any(f.startswith(own) for f in opened)  # the hook saw this process's own files
            assert not [f for f in opened if f.startswith(other)], f"block {block} opened block {1 - block}'s files"
