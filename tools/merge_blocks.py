"""Consolidate each block's DeepSpeed checkpoint (any ZeRO stage) into one merged model.

python tools/merge_blocks.py --run runs/tiny           # -> runs/tiny/merged/
python tools/merge_blocks.py --run runs/tiny --e2e     # -> runs/tiny/e2e/merged/
"""

import argparse

from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--e2e", action="store_true", help="merge the end-to-end baseline instead of the blocks")
    p.add_argument("--allow-unfinished", action="store_true", help="merge jobs that have not reached train.steps")
    args = p.parse_args()
    from dbscale.merge import merge_run

    merge_run(args.run, e2e=args.e2e, allow_unfinished=args.allow_unfinished)
    return 0


if __name__ == "__main__":
    cli_main(main)
