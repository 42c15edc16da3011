"""The run directory: the contract between independently launched jobs (docs/run_directory.md).

    runs/X/config.yaml                      resolved config, frozen at prepare time
    runs/X/manifest.json                    run id, partition, hashes of everything below
    runs/X/tokenizer/spm.model
    runs/X/data/{train,val}_NNNN.bin        tokenized memmap shards
    runs/X/target_embedding.safetensors     frozen, seeded, L2-normalised target table
    runs/X/blocks/b/  runs/X/e2e/           DeepSpeed checkpoints, tensorboard/, metrics.jsonl
    runs/X/merged/                          model.safetensors + manifest.json
    runs/X/calibration.json                 measured loss-vs-sigma curve (tools/calibrate_noise.py), if any

A run is prepared in a temporary sibling directory and renamed into place, so a crash never leaves a
half-prepared run. Every file is written to a temporary name, flushed and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import yaml

from dbscale import __version__
from dbscale.config import Config, config_from_dict, frozen_config_from_dict
from dbscale.data.prepare import JOURNAL, TOKENIZER
from dbscale.errors import DataError, RunError
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


def update_train_settings(run: Run, cfg: Config, diff: list[str], log=print) -> Run:
    """Rewrite the train.* settings of a prepared run (train.steps, the schedule, ...) before any job starts;
    afterwards refuse, saying how to continue."""
    started = started_blocks(run, with_e2e=True)
    if started:
        raise RunError(
            f"{run.root}: jobs {started} have started with the run's train settings, so they cannot change here "
            f"({'; '.join(diff[:6])}). Nothing was changed. Fix: to train a job further, resume it with the new "
            "value (e.g. dbscale train --run R --block b --set train.steps=N: the learning rate continues from the "
            "value it reached and decays to the minimum over the added steps, recorded in the job's checkpoints), "
            "or prepare a new --run to start fresh."
        )
    data = cfg.to_dict()
    current = run.config.to_dict()
    current["train"] = data["train"]
    new_cfg = config_from_dict(current, where=f"{run.root / CONFIG} (updated train settings)")
    atomic_write_text(run.root / CONFIG, yaml.safe_dump(new_cfg.to_dict(), sort_keys=False))
    manifest = dict(run.manifest)
    manifest.update(resolved_config_sha256=config_hash(new_cfg), config_sha256=sha256_file(run.root / CONFIG))
    if "calibration" in manifest:
        prepared = json.loads(json.dumps(manifest["calibration"]["prepared_config"]))
        prepared["train"] = data["train"]
        manifest["calibration"] = {**manifest["calibration"], "prepared_config": prepared}
    atomic_write_json(run.root / MANIFEST, manifest)
    log(f"[prepare] {run.root}: no job has started; updated {'; '.join(diff)}")
    return calibrate_if_pending(open_run(run.root), log)


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


# --------------------------------------------------------------------------------------------------------
# Creating a run.


def staging_dir(root: Path) -> Path:
    """Where a run is prepared before it is renamed into place; an interrupted prepare resumes there."""
    return root.parent / f".{root.name}.preparing"


def prepare_run(cfg: Config, root: str | Path, log=print) -> Run:
    """Create the run directory: tokenizer, shards, target embedding, manifest. Idempotent for the same
    config; refuses (and changes nothing) when the directory holds a run of another config.

    The corpus streams through in bounded memory (dbscale/data/prepare.py). Work happens in a staging directory
    beside the run, renamed into place once the manifest is written, so a half-prepared directory is never taken
    for a run; a prepare that is killed or fails keeps the staging directory's finished shards, and preparing
    again with the same config resumes after them."""
    from safetensors.torch import save_file

    from dbscale.data.prepare import fit_tokenizer, read_journal, tokenize_corpus
    from dbscale.data.shards import write_stamps
    from dbscale.data.sources import DocumentStream
    from dbscale.data.tokenizer import load_tokenizer
    from dbscale.diffusion.noise import frozen_target_embedding
    from dbscale.train.lock import JobLock

    root = Path(root)
    if root.exists():
        if (root / MANIFEST).is_file():
            existing = open_run(root, verify=False)
            # A calibrated run is compared with the config it was prepared from, so preparing again is a no-op.
            prepared = existing.manifest.get("calibration", {}).get("prepared_config", existing.config.to_dict())
            diff = prepared_config_diff(prepared, cfg, existing)
            if diff and all(d.startswith("train.") for d in diff):
                return update_train_settings(existing, cfg, diff, log)
            if diff:
                raise RunError(
                    f"{root}: already holds a run prepared from another config ({len(diff)} difference(s): "
                    f"{'; '.join(diff[:6])}). Nothing was changed. Fix: choose a new --run directory, or "
                    "remove this one if its checkpoints are not needed (only train.* may change on a prepared "
                    "run, and only before its jobs start)."
                )
            existing.verify()
            log(f"[prepare] {root} is already prepared with this config (run id {existing.run_id}); verified.")
            return calibrate_if_pending(existing, log)
        if any(root.iterdir()):
            raise RunError(f"{root}: exists, is not empty and holds no {MANIFEST}. Fix: choose a new --run directory.")

    frozen = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=None))  # not part of the run
    config_text = yaml.safe_dump(frozen.to_dict(), sort_keys=False)
    staging = staging_dir(root)
    staging.mkdir(parents=True, exist_ok=True)
    lock = JobLock(staging, f"a prepare of {root}")
    lock.acquire()
    try:
        t0 = time.time()
        journal = read_journal(staging, config_text, log)
        atomic_write_text(staging / CONFIG, config_text)
        stream = DocumentStream(cfg.data, log)
        size = f", {stream.total_bytes / 1e6:,.1f} MB" if stream.total_bytes else ""
        log(f"[prepare] reading documents from {stream.where}{size} (source: {cfg.data.source}) ...")
        tok_rel = journal.get("tokenizer_file")
        fitted = tok_rel and (staging / tok_rel).is_file()
        if fitted and sha256_file(staging / tok_rel) != journal["tokenizer_sha256"]:
            fitted = False
        if not fitted:
            tok_rel = fit_tokenizer(cfg.data, stream, staging, log)
            journal.update(tokenizer_file=tok_rel, tokenizer_sha256=sha256_file(staging / tok_rel), shards={})
            atomic_write_json(staging / JOURNAL, journal)
        tok = load_tokenizer(staging / tok_rel)
        if tok.vocab_size != cfg.data.vocab_size:
            raise DataError(
                f"data.vocab_size={cfg.data.vocab_size}, but the tokenizer has {tok.vocab_size} pieces. "
                f"Fix: set data.vocab_size: {tok.vocab_size}."
            )
        data, _ = tokenize_corpus(cfg.data, stream, staging, tok_rel, journal, log)
        n_val = sum(r["tokens"] for r in data["val"])
        if n_val < cfg.model.seq_len + 1:
            raise DataError(
                f"data: the validation split has {n_val} tokens, fewer than one window of model.seq_len+1="
                f"{cfg.model.seq_len + 1}. Fix: raise data.val_fraction or use a larger corpus."
            )

        hashes = {}
        if uses_target_embedding(cfg):
            table = frozen_target_embedding(tok.vocab_size, cfg.model.embed_dim, cfg.diffusion.target_seed)
            save_file({"target_embedding": table}, str(staging / TARGET_EMBEDDING))
            hashes["target_embedding_sha256"] = sha256_file(staging / TARGET_EMBEDDING)

        manifest = {
            "format_version": FORMAT_VERSION,
            "dbscale_version": __version__,
            "run_id": uuid.uuid4().hex,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "name": cfg.name,
            "family": cfg.model.family,
            "num_blocks": cfg.diffusion.num_blocks,
            "layers_per_block": cfg.layer_allocation(),
            "partition": partition_record(cfg),
            "vocab_size": tok.vocab_size,
            "resolved_config_sha256": config_hash(frozen),
            "config_sha256": sha256_file(staging / CONFIG),
            "tokenizer_file": tok_rel,
            "tokenizer_sha256": sha256_file(staging / tok_rel),
            **hashes,
            "data": data,
        }
        write_stamps(staging / "data")
        atomic_write_json(staging / MANIFEST, manifest)
        (staging / JOURNAL).unlink()
        lock.release()
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(staging, root)
        log(f"[prepare] run {root} ready in {time.time() - t0:.1f}s (run id {manifest['run_id']})")
    except BaseException:
        lock.release()
        if staging.is_dir() and any((staging / "data").glob("*.bin")):
            log(
                f"[prepare] stopped; the finished shards stay in {staging}: preparing again with the same config "
                f"resumes there (delete it to start over)."
            )
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return calibrate_if_pending(open_run(root), log)


def calibrate_if_pending(run: Run, log=print) -> Run:
    """partition 'calibrated' with boundaries null: measure CE(sigma) with a short calibration run and write the
    boundaries (diffusion.calibration method) into the run, as tools/calibrate_noise.py does. A crash leaves the
    run pending (block jobs refuse to start); preparing again resumes here."""
    if not run.manifest["partition"].get("pending"):
        return run
    from dbscale.diffusion.calibrate import propose
    from dbscale.train.calibration import measure_loss_curve

    d = run.config.diffusion
    layers = run.config.layer_allocation()[0]
    steps = d.calibration_steps or min(200, max(20, run.config.train.steps // 2))  # scaled to the training budget
    log(f"[prepare] calibrating the noise partition: a {layers}-layer denoiser, {steps} steps")
    curve = measure_loss_curve(run, steps, layers, log=log)
    proposals = propose(curve, d.num_blocks, d.P_mean, d.P_std)
    chosen = {k: v for k, v in proposals[d.calibration].items() if k != "boundaries_implied"}
    run = set_partition(run, chosen, {"method": d.calibration, "curve": curve, "proposals": proposals})
    bounds = [round(b, 4) for b in run.manifest["partition"]["sigma_boundaries"]]
    log(f"[prepare] partition '{d.calibration}': sigma boundaries {bounds}")
    return run
