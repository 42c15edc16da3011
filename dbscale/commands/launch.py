"""Start a run's block jobs: one `deepspeed` launcher per block, each on its own hosts and port.

    dbscale launch --run runs/X --hostfile hosts --dry-run     # print the commands
    dbscale launch --run runs/X --hostfile hosts               # all blocks at once, one node each
    dbscale launch --run runs/X --hostfile hosts --nodes-per-block 2 --blocks 0,2
    dbscale launch --run runs/X --local [--concurrent] [--e2e] # this machine

Each block writes R/blocks/b/hostfile and R/blocks/b/launch.log; progress is streamed with a [block b]
prefix; the end is a table of every job's state, step, last loss and checkpoint. A block that is restarted
resumes from its own checkpoint and never touches another block's files.
"""

import json
import os
import sys
from pathlib import Path

from dbscale.errors import RunError


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' per line)")
    where.add_argument("--local", action="store_true", help="run the jobs on this machine")
    p.add_argument("--blocks", help="comma-separated blocks to (re)start (default: all)")
    p.add_argument("--e2e", action="store_true", help="also start the end-to-end baseline")
    p.add_argument("--nodes-per-block", type=int, help="hosts per block (default: hosts // jobs)")
    p.add_argument("--num-gpus", type=int, help="with --local: processes per job (deepspeed --num_gpus)")
    p.add_argument("--concurrent", action="store_true", help="with --local: start all jobs at once")
    p.add_argument(
        "--master-port-base",
        type=int,
        help="job i uses this port + i (default: with --local, ports free on this machine now; with --hostfile, "
        "29600 + i)",
    )
    p.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="passed to every job")
    p.add_argument("--dry-run", action="store_true", help="print the commands (and host groups) and exit")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO lines")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object per job")


def execute(args, p) -> int:

    from dbscale.launch import execute as run_launches
    from dbscale.launch import plan
    from dbscale.run import open_run
    from dbscale.status import format_table, job_status

    run = open_run(args.run)
    B = run.num_blocks
    if args.blocks:
        try:
            blocks = sorted({int(b) for b in args.blocks.split(",")})
        except ValueError:
            raise RunError(f"--blocks {args.blocks}: expected comma-separated integers like 0,2.") from None
        bad = [b for b in blocks if not 0 <= b < B]
        if bad:
            raise RunError(f"--blocks: {bad} not in 0..{B - 1} (this run has {B} blocks).")
    else:
        blocks = list(range(B))
    stacked = run.config.diffusion.stack_context and len(blocks) > 1
    if stacked and args.concurrent:
        raise RunError(
            f"{run.root}: its blocks stack contexts (diffusion.stack_context: true): block b reads the finished "
            "block b-1, so they train one after another. Fix: drop --concurrent (a hostfile launch of such a run "
            "also runs its blocks in order); under Slurm, launchers/slurm/submit_stacked.sh chains the tasks "
            "with afterok."
        )
    extra = [x for item in args.set for x in ("--set", item)]
    launches = plan(
        run,
        blocks,
        args.hostfile,
        args.nodes_per_block,
        args.master_port_base,
        args.num_gpus,
        e2e=args.e2e,
        extra=extra,
        verbose=args.verbose,
    )
    if args.dry_run:
        for launch in launches:
            if args.json:
                print(
                    json.dumps(
                        {
                            "job": launch.name,
                            "hosts": launch.hosts,
                            "port": launch.port,
                            "hostfile": str(launch.hostfile) if launch.hostfile else None,
                            "command": launch.command,
                        }
                    )
                )
            else:
                print(f"# {launch.name}: hosts {','.join(launch.hosts)}, master port {launch.port}, log {launch.log}")
                print(" ".join(launch.command))
        return 0
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
    if args.local and not args.num_gpus:
        env.setdefault(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (len(launches) if args.concurrent else 1)))
        )
    for launch in launches:
        print(f"[launch] {launch.name}: hosts {','.join(launch.hosts)}, master port {launch.port}, log {launch.log}")
    concurrent = (bool(args.hostfile) or args.concurrent) and not stacked  # stacked: block b waits for b-1
    codes = run_launches(launches, concurrent=concurrent, cwd=None, env=env)
    rows = [job_status(run, launch.block) for launch in launches]
    for row, launch in zip(rows, launches, strict=True):
        row["exit"] = codes[launch.name]
        if codes[launch.name] != 0:
            error = last_error(launch.log)
            if error and "is already running" in error:
                row["state"], row["step"] = "already running", "-"  # the metrics are the other job's
            elif not row.get("problem"):  # a refused or damaged checkpoint keeps the state status gives it
                row["state"] = f"failed ({codes[launch.name]})"
            if error != row.get("problem"):
                row["error"] = error or f"exit status {codes[launch.name]}; see {launch.log}"
    print(format_table(rows))
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        print(
            f"failed: {', '.join(failed)}; see their launch.log. Rerun with --blocks to restart them.", file=sys.stderr
        )
        return 1
    return 0


def last_error(log: Path) -> str | None:
    """The last 'dbscale: error:' line a job printed (one per rank; they agree), without the prefix."""
    if not log.is_file():
        return None
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "dbscale: error:" in ln]
    return lines[-1].split("dbscale: error:", 1)[1].strip() if lines else None
