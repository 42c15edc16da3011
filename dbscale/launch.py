"""Fan a run's B block jobs out over a cluster (or this machine), one `deepspeed` launcher per block.

Each block gets a disjoint group of hosts from a DeepSpeed hostfile, its own hostfile (written into
R/blocks/b/hostfile), its own master port, its own log (R/blocks/b/launch.log) and its own exit status.
Nothing is shared between the block jobs: they may run at the same time on different nodes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbscale.errors import RunError
from dbscale.files import atomic_write_text

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"  # the repository's launcher scripts
_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)(\s+slots=(?P<slots>\d+))?\s*$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed hostfile: `host slots=N` per line, '#' comments. Returns [(host, slots)]."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such hostfile. Fix: write one line per node, e.g. 'node1 slots=8'.")
    hosts: list[tuple[str, int]] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise RunError(f"{path}:{n}: '{raw.strip()}' is not 'HOST slots=N'.")
        host, slots = m.group("host"), int(m.group("slots") or 1)
        if slots < 1:
            raise RunError(f"{path}:{n}: slots must be >= 1.")
        if host in (h for h, _ in hosts):
            raise RunError(f"{path}:{n}: host '{host}' is listed twice.")
        hosts.append((host, slots))
    if not hosts:
        raise RunError(f"{path}: the hostfile lists no host.")
    return hosts


def assign_hosts(
    hosts: list[tuple[str, int]], blocks: list[int], nodes_per_block: int | None, hostfile: str
) -> dict[int, list[tuple[str, int]]]:
    """Disjoint, consecutive host groups, one per block."""
    per = nodes_per_block or max(1, len(hosts) // len(blocks))
    if per * len(blocks) > len(hosts):
        raise RunError(
            f"{hostfile}: {len(blocks)} block(s) x {per} node(s) need {per * len(blocks)} hosts, the hostfile has "
            f"{len(hosts)}. Fix: lower --nodes-per-block, or start fewer blocks at once with --blocks (in waves)."
        )
    return {b: hosts[i * per : (i + 1) * per] for i, b in enumerate(blocks)}


def mapped_hosts(
    hosts: list[tuple[str, int]], block_hosts: list[list[str]], jobs: list[int | None], hostfile: str
) -> dict[int | None, list[tuple[str, int]]]:
    """Host groups from the config's explicit map (train.block_hosts); the baseline, if launched, gets the
    hostfile's hosts that no block uses."""
    slots = dict(hosts)
    groups: dict[int | None, list[tuple[str, int]]] = {}
    for job in jobs:
        if job is None:
            used = {h for group in block_hosts for h in group}
            rest = [(h, n) for h, n in hosts if h not in used]
            if not rest:
                raise RunError(
                    f"{hostfile}: train.block_hosts uses every host; none is left for the end-to-end baseline. "
                    "Fix: add a host to the hostfile, or launch the baseline separately."
                )
            groups[None] = rest
            continue
        missing = [h for h in block_hosts[job] if h not in slots]
        if missing:
            raise RunError(
                f"{hostfile}: train.block_hosts[{job}] names {missing}, which the hostfile does not list. Fix: add "
                "them to the hostfile or correct train.block_hosts in the run's config."
            )
        groups[job] = [(h, slots[h]) for h in block_hosts[job]]
    return groups


def block_partition_pending(run) -> bool:
    return bool(run.manifest["partition"].get("pending"))


@dataclass
class BlockLaunch:
    block: int | None  # None = the end-to-end baseline
    command: list[str]
    log: Path
    hostfile: Path | None = None
    hosts: list[str] = field(default_factory=list)
    port: int = 0
    hostfile_text: str = ""  # this job's own hostfile, written by execute() (never by a dry run)

    @property
    def name(self) -> str:
        return "e2e" if self.block is None else f"block {self.block}"


DEFAULT_HOSTFILE_PORT_BASE = 29600


def local_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on this machine now (the OS picks them), so two runs or two
    users on one node never race for a fixed port."""
    from dbscale.train.distributed import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def plan(
    run,
    blocks: list[int],
    hostfile: str | None,
    nodes_per_block: int | None,
    port_base: int | None,
    num_gpus: int | None,
    e2e: bool = False,
    extra: list[str] | None = None,
    verbose: bool = False,
) -> list[BlockLaunch]:
    """The deepspeed command of every job; with a hostfile, also each block's own hostfile content.

    Master ports: job i uses port_base + i when given. Otherwise a local launch takes ports that are free
    here now, and a hostfile launch uses DEFAULT_HOSTFILE_PORT_BASE + i (the master is a remote host, whose
    ports cannot be probed from here); every launch records its port in its log and the summary."""
    if block_partition_pending(run) and blocks:
        raise RunError(
            f"{run.root}: the noise partition is still to be calibrated (prepare was interrupted), so no block "
            f"knows its slice; nothing was started. Fix: run tools/prepare.py again with the same --config and "
            f"--run {run.root} (it finishes the calibration), then launch."
        )
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    jobs: list[int | None] = [*blocks, *([None] if e2e else [])]
    all_hosts = read_hostfile(hostfile) if hostfile else []
    block_hosts = run.config.train.block_hosts
    if hostfile and block_hosts is not None:
        groups = mapped_hosts(all_hosts, block_hosts, jobs, hostfile)
    else:
        groups = assign_hosts(all_hosts, jobs, nodes_per_block, hostfile) if hostfile else {}
    if port_base is not None:
        ports = [port_base + i for i in range(len(jobs))]
    elif hostfile:
        ports = [DEFAULT_HOSTFILE_PORT_BASE + i for i in range(len(jobs))]
    else:
        ports = local_ports(len(jobs))
    quiet = [] if verbose else ["--log_level", "warning"]  # the launcher's INFO lines
    launches = []
    for job, port in zip(jobs, ports, strict=True):
        job_dir = run.job_dir(job)
        script = [str(LAUNCHERS / ("train_e2e.py" if job is None else "train_block.py"))]
        args = ["--run", str(run.root), *([] if job is None else ["--block", str(job)]), *(extra or [])]
        if hostfile:
            group = groups[job]
            job_hostfile = job_dir / "hostfile"
            cmd = [
                deepspeed,
                "--hostfile",
                str(job_hostfile),
                "--force_multi",  # through pdsh even for one host: the block's hosts need not include this one
                "--master_addr",
                group[0][0],
                "--master_port",
                str(port),
                *quiet,
                *script,
                *args,
            ]
            text = "".join(f"{h} slots={n}\n" for h, n in group)
            launches.append(
                BlockLaunch(job, cmd, job_dir / "launch.log", job_hostfile, [h for h, _ in group], port, text)
            )
        else:
            gpus = ["--num_gpus", str(num_gpus)] if num_gpus else []
            cmd = [deepspeed, *gpus, "--master_port", str(port), *quiet, *script, *args]
            launches.append(BlockLaunch(job, cmd, job_dir / "launch.log", None, ["localhost"], port))
    return launches


def _stream(proc: subprocess.Popen, prefix: str, log_file, lock: threading.Lock) -> None:
    for line in iter(proc.stdout.readline, ""):
        log_file.write(line)
        log_file.flush()
        with lock:
            sys.stdout.write(f"[{prefix}] {line}")
            sys.stdout.flush()


def execute(launches: list[BlockLaunch], concurrent: bool, cwd: Path | None, env: dict) -> dict[str, int]:
    """Run the launches (all at once, or one after another); returns each job's exit status."""
    lock = threading.Lock()
    codes: dict[str, int] = {}

    def start(launch: BlockLaunch):
        launch.log.parent.mkdir(parents=True, exist_ok=True)
        if launch.hostfile is not None:
            atomic_write_text(launch.hostfile, launch.hostfile_text)
        log_file = open(launch.log, "a")
        log_file.write(
            f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} hosts {','.join(launch.hosts)}, master port {launch.port}: "
            f"{' '.join(launch.command)}\n"
        )
        proc = subprocess.Popen(
            launch.command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        thread = threading.Thread(target=_stream, args=(proc, launch.name, log_file, lock), daemon=True)
        thread.start()
        return proc, thread, log_file

    running = []
    for launch in launches:
        handle = start(launch)
        if concurrent:
            running.append((launch, handle))
        else:
            _finish(launch, handle, codes)
    for launch, handle in running:
        _finish(launch, handle, codes)
    return codes


def _finish(launch: BlockLaunch, handle, codes: dict[str, int]) -> None:
    proc, thread, log_file = handle
    codes[launch.name] = proc.wait()
    thread.join()
    log_file.close()
