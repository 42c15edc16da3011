"""The run directory: the contract between independently launched jobs (docs/run_directory.md).

    runs/X/config.yaml                      resolved config, frozen at prepare time
    runs/X/manifest.json                    run id, partition, hashes of everything below
    runs/X/tokenizer/spm.model
    runs/X/data/{train,val}_NNNN.bin        tokenized memmap shards
    runs/X/target_embedding.safetensors     frozen, seeded, L2-normalised target table
    runs/X/blocks/b/  runs/X/e2e/           DeepSpeed checkpoints, tensorboard/, metrics.jsonl
    runs/X/merged/                          model.safetensors + manifest.json
    runs/X/calibration.json                 measured loss-vs-sigma curve (tools/calibrate_noise.py), if any

This module opens, verifies and updates a prepared run; dbscale/create_run.py creates one (in a staging directory
renamed into place, so a crash never leaves a half-prepared run). Every file is written to a temporary name,
flushed and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import yaml

from dbscale import __version__
from dbscale.config import Config
from dbscale.data.prepare import TOKENIZER
from dbscale.errors import RunError
from dbscale.families import frozen_config_from_dict
from dbscale.files import atomic_write_json, atomic_write_text, read_json, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TARGET_EMBEDDING = "target_embedding.safetensors"
CALIBRATION = "calibration.json"


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def uses_target_embedding(cfg: Config) -> bool:
    """Whether the run's family denoises in a frozen target space (target_embedding.safetensors)."""
    from dbscale import families

    return families.get(cfg.model.family).target_table


def partition_record(cfg: Config) -> dict:
    """What the manifest records of the partition (the family decides; every job and merged model reads it)."""
    from dbscale import families

    return families.get(cfg.model.family).partition_record(cfg)


# --------------------------------------------------------------------------------------------------------
# Opening and verifying a prepared run.


@dataclasses.dataclass
class Run:
    root: Path
    config: Config
    manifest: dict

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def num_blocks(self) -> int:
        return self.config.diffusion.num_blocks

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def job_dir(self, block: int | None) -> Path:
        """blocks/b for a block job, e2e/ for the baseline."""
        return self.root / "e2e" if block is None else self.root / "blocks" / str(block)

    @property
    def tokenizer_file(self) -> str:
        """The tokenizer's path inside the run (runs prepared before char tokenizers existed: spm.model)."""
        return self.manifest.get("tokenizer_file", TOKENIZER)

    def tokenizer(self):
        from dbscale.data.tokenizer import load_tokenizer

        return load_tokenizer(self.root / self.tokenizer_file)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def verify(self) -> None:
        """Check that config, tokenizer and target embedding are the files the manifest was made with."""
        checks = {CONFIG: "config_sha256", self.tokenizer_file: "tokenizer_sha256"}
        if "target_embedding_sha256" in self.manifest:
            checks[TARGET_EMBEDDING] = "target_embedding_sha256"
        for rel, key in checks.items():
            path = self.root / rel
            if not path.is_file():
                raise RunError(f"{path}: missing from the run. Fix: re-create the run with tools/prepare.py.")
            if sha256_file(path) != self.manifest[key]:
                raise RunError(
                    f"{path}: sha256 differs from {self.root / MANIFEST} ({key}); the file was changed or "
                    "copied from another run. Fix: restore the original file, or prepare a new run directory."
                )
        # The resolved-config hash is recorded for information only: a newer dbscale may add fields with
        # defaults, which changes it without changing the run; the file hash above catches any edit.

    def load_target_embedding(self):
        from safetensors.torch import load_file

        if "target_embedding_sha256" not in self.manifest:
            raise RunError(f"{self.root}: a {self.config.model.family} run has no target embedding.")
        path = self.root / TARGET_EMBEDDING
        return load_file(str(path))["target_embedding"]

    def shards(self, split: str):
        from dbscale.data.shards import TokenShards

        data = self.manifest["data"]
        return TokenShards(self.root / "data", data[split], data["dtype"], split)


def started_blocks(run: Run, with_e2e: bool = False) -> list:
    """Blocks that have trained with the current partition, or may be training now: a checkpoint tag, a
    training step in metrics.jsonl, or a job lock. A launch log alone (a job refused at start) does not count."""
    from dbscale.train.checkpoint import list_tags
    from dbscale.train.lock import LOCK
    from dbscale.train.metrics import read_metrics

    def started(job_dir: Path) -> bool:
        if not job_dir.is_dir():
            return False
        if list_tags(job_dir) or (job_dir / LOCK).exists():
            return True
        return any(e.get("event") == "train" for e in read_metrics(job_dir / "metrics.jsonl"))

    jobs = [*range(run.num_blocks), *([None] if with_e2e else [])]
    return [("e2e" if b is None else b) for b in jobs if started(run.job_dir(b))]


# Read at prepare time only: once the partition is measured, another value changes nothing in the run.
_CALIBRATION_ONLY = ("diffusion.calibration_steps",)
# How a run is prepared, not what it is: never frozen into the run (its shards do not depend on it).
_PREPARE_ONLY = ("data.num_workers",)


def prepared_config_diff(prepared: dict, cfg: Config, run: Run) -> list[str]:
    """How `cfg` differs from the config a run was prepared from, both resolved by this dbscale: a field added
    since (absent from the run's record) takes the value that keeps the run's behaviour (config.ADDED_FIELDS, else
    its default), so a run prepared by an earlier version can be prepared (resumed) again with a config that
    says the same."""
    where = f"{run.root / MANIFEST} (prepared config)"
    resolved = frozen_config_from_dict(json.loads(json.dumps(prepared)), where=where)
    diff = [d for d in config_diff(resolved.to_dict(), cfg.to_dict()) if not d.startswith(_PREPARE_ONLY)]
    if not run.manifest["partition"].get("pending"):
        diff = [d for d in diff if not d.startswith(_CALIBRATION_ONLY)]
    return diff


def set_partition(run: Run, changes: dict, calibration: dict) -> Run:
    """Rewrite the run's diffusion settings (partition, boundaries, P_mean, P_std) before any block starts.

    Writes calibration.json (the measurement and the choice), then config.yaml, then the manifest with the
    new hashes and partition. Refuses when a block job has started: its slice would change under it.
    """
    started = started_blocks(run)
    if started:
        raise RunError(
            f"{run.root}: block(s) {started} have already started with the current partition; changing it now "
            "would give blocks inconsistent slices. Fix: calibrate a freshly prepared run (the same config in a "
            "new --run directory), or remove those blocks' directories if their checkpoints are not needed."
        )
    allowed = {"partition", "boundaries", "P_mean", "P_std"}
    if set(changes) - allowed:
        raise ValueError(f"set_partition changes only {sorted(allowed)}, got {sorted(changes)}")
    prepared = run.manifest.get("calibration", {}).get("prepared_config", run.config.to_dict())
    data = json.loads(json.dumps(prepared))
    data["diffusion"].update(changes)
    if data["diffusion"].get("partition") != "calibrated":
        data["diffusion"]["boundaries"] = None
    cfg = frozen_config_from_dict(data, where=f"{run.root / CONFIG} (calibrated)")
    record = dict(calibration, applied=changes)
    atomic_write_json(run.root / CALIBRATION, record)
    atomic_write_text(run.root / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    manifest = dict(run.manifest)
    manifest.update(
        partition=partition_record(cfg),
        resolved_config_sha256=config_hash(cfg),
        config_sha256=sha256_file(run.root / CONFIG),
        calibration={
            "file": CALIBRATION,
            "sha256": sha256_file(run.root / CALIBRATION),
            "method": calibration.get("method"),
            "applied": changes,
            "prepared_config": prepared,
        },
    )
    atomic_write_json(run.root / MANIFEST, manifest)
    return open_run(run.root)


def open_run(root: str | Path, verify: bool = True) -> Run:
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such run directory. Fix: create it with tools/prepare.py --config C --run {root}.")
    manifest = read_json(root / MANIFEST, "run manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RunError(
            f"{root / MANIFEST}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION} "
            f"(this dbscale is {__version__}). Fix: prepare the run again with this version."
        )
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise RunError(f"{cfg_path}: missing. Fix: re-create the run with tools/prepare.py.")
    cfg = frozen_config_from_dict(yaml.safe_load(cfg_path.read_text()), where=str(cfg_path))
    run = Run(root, cfg, manifest)
    if verify:
        run.verify()
    return run
