"""Consolidate each block's DeepSpeed checkpoint (any ZeRO stage) into one merged model.

dbscale merge --run runs/tiny           # -> runs/tiny/merged/
dbscale merge --run runs/tiny --e2e     # -> runs/tiny/e2e/merged/
"""


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--e2e", action="store_true", help="merge the end-to-end baseline instead of the blocks")
    p.add_argument("--allow-unfinished", action="store_true", help="merge jobs that have not reached train.steps")


def execute(args, p) -> int:
    from dbscale.merge import merge_run

    merge_run(args.run, e2e=args.e2e, allow_unfinished=args.allow_unfinished)
    return 0
