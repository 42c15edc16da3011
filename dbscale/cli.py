"""The `dbscale` command: every step of a run's life as a verb (`dbscale --help`, `dbscale VERB --help`).

dbscale prepare --config configs/llama_tiny.yaml --run runs/mine --data my_corpus.txt
dbscale launch --run runs/mine --local --e2e
dbscale merge --run runs/mine && dbscale merge --run runs/mine --e2e
dbscale evaluate --model runs/mine/merged --compare runs/mine/e2e/merged --data runs/mine
"""

from __future__ import annotations

import argparse
import sys

from dbscale import __version__
from dbscale.commands import VERBS, HelpFormatter, module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbscale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"dbscale {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (_, summary) in VERBS.items():
        mod = module(verb)
        sp = sub.add_parser(verb, help=summary, description=mod.__doc__, formatter_class=HelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_execute=mod.execute, _parser=sp)
    return p


def main(argv: list[str] | None = None) -> int:
    from dbscale.errors import cli_main

    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return cli_main(lambda: args._execute(args, args._parser))


if __name__ == "__main__":
    main()
