"""Train one job of a run (a block, or the end-to-end baseline) through the DeepSpeed launcher.

dbscale train --run runs/mine --block 0                 # block 0 on this machine (one process per GPU, or one on CPU)
dbscale train --run runs/mine --e2e                      # the baseline
dbscale train --run runs/mine --block 1 --num-gpus 4     # data-parallel inside the job
dbscale train --run runs/mine --block 2 --hostfile hosts # over the nodes of a DeepSpeed hostfile

The same as `deepspeed [options] launchers/train_block.py --run R --block b`, with a free master port picked
for a local job. A job resumes from its newest intact checkpoint; rerunning a finished job changes nothing.
"""

import os
import subprocess
import sys


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory made by `dbscale prepare`")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", type=int, help="block index, 0 = highest noise (the first layers)")
    which.add_argument("--e2e", action="store_true", help="train the end-to-end baseline")
    p.add_argument("--num-gpus", type=int, help="processes on this machine (deepspeed --num_gpus; default: all GPUs)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' per line): a multi-node job")
    p.add_argument("--master-port", type=int, help="default: a free port here (a hostfile job: 29600)")
    p.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="override a train.* setting")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO lines")
    p.add_argument("--dry-run", action="store_true", help="print the deepspeed command and exit")


def command(args) -> list[str]:
    from dbscale.launch import DEFAULT_HOSTFILE_PORT_BASE, LAUNCHERS, local_ports

    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = args.master_port or (DEFAULT_HOSTFILE_PORT_BASE if args.hostfile else local_ports(1)[0])
    cmd = [deepspeed]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile, "--force_multi"]
    elif args.num_gpus:
        cmd += ["--num_gpus", str(args.num_gpus)]
    cmd += ["--master_port", str(port)]
    if not args.verbose:
        cmd += ["--log_level", "warning"]
    script = LAUNCHERS / ("train_e2e.py" if args.e2e else "train_block.py")
    cmd += [str(script), "--run", args.run]
    if not args.e2e:
        cmd += ["--block", str(args.block)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd


def execute(args, p) -> int:
    cmd = command(args)
    print(("" if args.dry_run else "$ ") + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    if args.verbose:
        env["DBSCALE_VERBOSE"] = "1"
    return subprocess.run(cmd, env=env).returncode
