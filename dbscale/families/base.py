"""What a model family is to dbscale: one object that answers every family question the framework asks.

The trainer, merge, the run directory, evaluation and the reports never name a family; they ask the run's
family (`dbscale.families.get(cfg.model.family)`) to build its models, draw a micro-batch's noise, compute a
job's loss, record and read back its partition, validate its config and draw its partition. Adding a family is
one module with a `Family` subclass plus one `register(...)` line (docs/adding_a_family.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dbscale.config import default_layer_allocation


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (numpy's SeedSequence): data windows,
    noise and recurrence depths are functions of (seed, job, step, rank, ...), so a resumed job repeats them."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Job:
    """One training job of a run as its family sees it: the block (None = the end-to-end baseline), the slice it
    trains on and whatever the family keeps for its loss (the frozen target table, a mask schedule, ...)."""

    cfg: Any  # the run's Config
    vocab_size: int
    block: int | None
    interval: tuple[float, float] | None = None  # the block's widened training slice (sigma or t)
    extras: dict = field(default_factory=dict)

    @property
    def is_block(self) -> bool:
        return self.block is not None


@dataclass(frozen=True)
class StepInfo:
    """Where a micro-batch sits in the run: what a family may seed step-dependent draws with."""

    seed: int
    index: int  # the micro-batch's index over the whole job: step * grad_accum + micro
    rank: int


class Family:
    """The base: families override what differs. Every method takes the run's Config (or a Job)."""

    name: str = ""
    space: str = "sigma"  # what the partition splits: 'sigma' (Gaussian noise) or 't' (masking time)
    target_table: bool = True  # the run holds a frozen, seeded target embedding (target_embedding.safetensors)
    calibratable: bool = False  # can measure CE(sigma) to place its boundaries (diffusion.partition: calibrated)
    generates: str = "tokens"  # 'tokens': one token after another (next_token_logits); 'sequence': all at once
    # The dataclass of the family's own fields, written as `model.<name>:` and read as cfg.model.family_config
    # (None: the family reads only the shared ModelConfig).
    config_section: type | None = None

    # --- config -------------------------------------------------------------------------------------------
    def validate(self, cfg, fail) -> None:
        """Family-specific cross-field checks; fail(key, message) raises the ConfigError."""

    def layer_allocation(self, cfg) -> list[int]:
        """Layers owned by each block, block 0 (highest noise, next to the input) first."""
        return default_layer_allocation(cfg)

    # --- the partition: what the manifest stores, and what every job and merged model reads back ------------
    def partition_record(self, cfg) -> dict:
        raise NotImplementedError

    def partition(self, record: dict):
        """The typed partition of a manifest record (for a merged model: the record of its own manifest)."""
        raise NotImplementedError

    # --- models ---------------------------------------------------------------------------------------------
    def window_length(self, cfg) -> int:
        """Tokens per training window (an AR family predicts seq_len tokens from seq_len + 1)."""
        return cfg.model.seq_len + 1

    def job(self, run, block: int | None) -> Job:
        """What a job needs beyond its model (its slice, the target table)."""
        from dbscale.errors import RunError

        interval = None
        if block is not None:
            record = run.manifest["partition"]
            if record.get("pending"):
                raise RunError(
                    f"{run.root}: the noise partition is still to be calibrated (diffusion.boundaries: null); a "
                    f"block cannot know its slice. Fix: run tools/prepare.py again with the same --config and "
                    f"--run (it finishes the calibration), or tools/calibrate_noise.py --run {run.root}."
                )
            interval = tuple(self.partition(record).train_intervals[block])
        return Job(run.config, run.vocab_size, block, interval)

    def build(self, job: Job) -> nn.Module:
        """The module a job trains: block `job.block`, or the baseline."""
        raise NotImplementedError

    def build_merged(self, cfg, vocab_size: int, manifest: dict, state: dict[str, torch.Tensor]) -> tuple:
        """(model, state) of a merged model: the chain of blocks (manifest kind 'blocks') or the baseline
        ('e2e'), with its safetensors state mapped onto the model's keys."""
        raise NotImplementedError

    # --- training -------------------------------------------------------------------------------------------
    def draw(self, job: Job, window: torch.Tensor, noise_seed: int) -> tuple:
        """The random inputs of one micro-batch (noise levels, noise), a pure function of noise_seed; () when
        the job needs none."""
        return ()

    def loss(self, job: Job, model, window: torch.Tensor, draw: tuple, step: StepInfo) -> tuple:
        """(loss to minimise, per-sequence plain cross-entropy (B,) for the logs), both fp32."""
        raise NotImplementedError

    # --- reporting ------------------------------------------------------------------------------------------
    def partition_figure(self, run, path: Path, plt) -> None:
        """Draw the run's partition into `path` (R/report/partition.png)."""
        raise NotImplementedError

    def dry_run_models(self, cfg, vocab_size: int) -> tuple[nn.Module, list[nn.Module]]:
        """(baseline, blocks) built on the meta device, for parameter counts."""
        raise NotImplementedError
