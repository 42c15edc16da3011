"""Create a run directory from a config: tokenizer, tokenized shards, frozen target embedding, manifest.

python tools/prepare.py --config configs/llama_tiny.yaml --run runs/tiny
python tools/prepare.py --config configs/llama_lm1b_b4.yaml --dry-run     # print the plan as JSON
"""

import argparse
import json

from dbscale.config import describe, load_config
from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--run", help="run directory to create")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--dry-run", action="store_true", help="print config, partition and parameter counts; write nothing")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    args = p.parse_args()
    if args.help_config:
        print(describe())
        return 0
    if not args.config:
        p.error("--config is required")
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        from dbscale.inspect import dry_run_report

        print(json.dumps(dry_run_report(cfg), indent=2))
        return 0
    if not args.run:
        p.error("--run is required (or pass --dry-run)")
    from dbscale.run import prepare_run

    prepare_run(cfg, args.run)
    return 0


if __name__ == "__main__":
    cli_main(main)
