"""Create a run directory from a config: tokenizer, tokenized shards, frozen target embedding, noise partition.

dbscale prepare --config configs/llama_tiny.yaml --run runs/tiny                      # the bundled speeches
dbscale prepare --config configs/llama_tiny.yaml --run runs/mine --data my_corpus.txt # your own text
dbscale prepare --config configs/llama_tiny.yaml --run runs/mine --data 'books/*.txt' --set train.steps=1000
dbscale prepare --config configs/llama_lm1b_b4.yaml --dry-run                         # print the plan as JSON

--data takes a text file (cut into documents at blank lines when it is one big file), a folder of .txt or
.jsonl files (one JSON object with a "text" field per line), a glob, or a Hugging Face dataset name. Preparing
an existing run again with the same config changes nothing; with other train.* values (say train.steps) it
updates the run while no job has started.
"""

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument("--run", help="run directory to create")
    p.add_argument("--data", help="your corpus: a file, a folder, a glob, or an HF dataset name")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--dry-run", action="store_true", help="print config, partition and parameter counts; write nothing")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")


def data_overrides(data: str) -> list[str]:
    """--data as config overrides: local files (a file, a folder or a glob) or a Hugging Face dataset."""
    import glob

    if Path(data).exists() or glob.has_magic(data):
        return ["data.source=files", f"data.paths={json.dumps([data])}"]
    if "/" in data or data.startswith("."):
        from dbscale.errors import DataError

        raise DataError(f"--data {data}: no such file or folder. Fix: give an existing file, folder or glob.")
    return ["data.source=hf", f"data.hf_path={json.dumps(data)}"]


def execute(args, p) -> int:
    from dbscale.config import describe
    from dbscale.families import load_config

    if args.help_config:
        print(describe())
        return 0
    if not args.config:
        p.error("--config is required")
    overrides = (data_overrides(args.data) if args.data else []) + args.set
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from dbscale.inspect import dry_run_report

        print(json.dumps(dry_run_report(cfg), indent=2))
        return 0
    if not args.run:
        p.error("--run is required (or pass --dry-run)")
    from dbscale.create_run import prepare_run

    prepare_run(cfg, args.run)
    return 0
