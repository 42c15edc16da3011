"""Command line of the training launchers (`launchers/train_block.py`, `launchers/train_e2e.py`).

Run under the DeepSpeed launcher (`deepspeed [--num_gpus N] launchers/train_block.py --run R --block b`)
or as one plain process (`python launchers/train_block.py --run R --block b`).
"""

from __future__ import annotations

import argparse
import json
import sys

from dbscale.errors import ConfigError, DbscaleError


def parse_args(argv: list[str], kind: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"launchers/train_{kind}.py",
        description="Train one DiffusionBlocks block of a run."
        if kind == "block"
        else "Train the end-to-end baseline of a run.",
    )
    p.add_argument("--run", required=True, help="run directory made by tools/prepare.py")
    if kind == "block":
        p.add_argument("--block", type=int, required=True, help="block index, 0 = highest noise (first layers)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="train.KEY=VALUE",
        help="override a train.* setting for this job (model, data and partition are fixed at prepare time)",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def _apply_train_overrides(run, overrides: list[str]) -> None:
    from dbscale.config import apply_overrides
    from dbscale.families import config_from_dict

    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("train."):
            raise ConfigError(
                f"--set {item}: only train.* can change after a run is prepared (model, data and diffusion are "
                "frozen in the run's config.yaml). Fix: prepare a new run for other changes."
            )
    data = apply_overrides(run.config.to_dict(), overrides)
    run.config = config_from_dict(data, where="--set")


def main(argv: list[str], kind: str) -> int:
    args = parse_args(argv, kind)
    from dbscale.run import open_run
    from dbscale.train.distributed import finish, init_distributed

    rank = 0
    try:
        run = open_run(args.run)  # verifies config, tokenizer and target embedding against the manifest
        _apply_train_overrides(run, args.set)
        rank, world, _ = init_distributed()
        from dbscale.train.trainer import Trainer

        trainer = Trainer(run, args.block if kind == "block" else None, rank, world)
        try:
            result = trainer.train()
        finally:
            trainer.close()
        if rank == 0:
            print(json.dumps({"job": trainer.job, **result}), flush=True)
    except DbscaleError as e:
        print(f"dbscale: error: {e}", file=sys.stderr, flush=True)
        finish(2)
    finish(0)
    return 0
