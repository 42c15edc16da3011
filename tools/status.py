"""The state of every job of a run: step, losses, throughput, memory, checkpoint.

python tools/status.py --run runs/demo [--json]
"""

import argparse
import json

from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--json", action="store_true", help="one JSON object per job instead of a table")
    args = p.parse_args()
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


if __name__ == "__main__":
    cli_main(main)
