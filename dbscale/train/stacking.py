"""Stacked context (diffusion.stack_context): block b > 0 reads the frozen residual stream of blocks 0..b-1.

A stacked block job loads its predecessors' finished checkpoints (verified and consolidated as merge does), runs
them forward only, and records the sha256 of each predecessor's weights in every checkpoint it writes. A job
refuses to start while a predecessor is missing or unfinished, and to resume when a predecessor's weights are no
longer the ones it trained on; merge refuses a chain whose blocks disagree the same way. No gradient crosses a
block boundary: the predecessors are not parameters of the job's model.
"""

from __future__ import annotations

import torch

from dbscale.errors import CheckpointError
from dbscale.files import state_sha256


def stacked(cfg) -> bool:
    return bool(cfg.diffusion.stack_context)


def load_predecessors(run, block: int, family) -> tuple[list[torch.nn.Module], list[dict]]:
    """Blocks 0..block-1 of the run, finished, frozen and in eval mode, with their records
    ({block, tag, step, sha256}) for the job's checkpoints."""
    from dbscale.merge import consolidate

    modules, records = [], []
    for b in range(block):
        try:
            state, source = consolidate(run, b, allow_unfinished=False)
        except CheckpointError as e:
            raise CheckpointError(
                f"block {block} reads the features of blocks 0..{block - 1} (diffusion.stack_context: true), so "
                f"they train first, in order. {e}"
            ) from None
        module = family.build(family.job(run, b))
        module.load_state_dict(state, strict=True)
        if b > 0:
            module.read_from(list(modules))
        modules.append(module)
        records.append({"block": b, **source, "sha256": state_sha256(state)})
    return modules, records


def check_predecessors(path, block: int, saved: list[dict] | None, current: list[dict]) -> None:
    """Refuse to resume block `block` from the checkpoint at `path` when the predecessors it was trained on
    (`saved`, from its marker) are not the ones the run holds now (`current`)."""
    if saved is None:
        raise CheckpointError(
            f"{path}: block {block}'s checkpoint records no predecessors, but the run stacks contexts "
            "(diffusion.stack_context: true). Fix: retrain the block from scratch (remove its checkpoints)."
        )
    now = {r["block"]: r for r in current}
    for record in saved:
        b = record["block"]
        if b not in now or now[b]["sha256"] != record["sha256"]:
            got = now[b]["sha256"][:12] if b in now else "missing"
            raise CheckpointError(
                f"{path}: block {block} was trained on block {b} with weights sha256 {record['sha256'][:12]} "
                f"(its checkpoint {record.get('tag')}), but block {b} now holds {got}: it was retrained or changed "
                f"after block {block} started. Nothing was loaded. Fix: retrain block {block} (and every later "
                f"block) from scratch on the new block {b} (remove {path.parent}), or restore block {b}'s "
                "checkpoint."
            )
