"""The state of every job of a run: step, losses, throughput, memory, checkpoint.

dbscale status --run runs/demo [--json]
"""

import json


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--json", action="store_true", help="one JSON object per job instead of a table")


def execute(args, p) -> int:
    from dbscale import families
    from dbscale.report import PENDING_NOTE
    from dbscale.run import open_run
    from dbscale.status import format_table, run_status

    rows = run_status(args.run)
    run = open_run(args.run, verify=False)
    space = families.get(run.config.model.family).space
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows, space))
        if run.manifest["partition"].get("pending"):
            print(PENDING_NOTE)
    return 0
