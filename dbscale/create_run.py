"""Creating a run directory (`dbscale prepare`): the corpus streamed to a tokenizer and shards
(dbscale/data/prepare.py), the frozen target table, the manifest, and the noise calibration that a
'calibrated' partition measures before any block may start.

A run is prepared in a staging directory beside it and renamed into place once the manifest is written, so a
half-prepared directory is never taken for a run (docs/run_directory.md, docs/data.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import yaml

from dbscale import __version__, families
from dbscale.config import Config
from dbscale.data.prepare import JOURNAL
from dbscale.errors import DataError, RunError
from dbscale.families import config_from_dict
from dbscale.files import atomic_write_json, atomic_write_text, sha256_file
from dbscale.run import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    TARGET_EMBEDDING,
    Run,
    config_hash,
    open_run,
    partition_record,
    prepared_config_diff,
    set_partition,
    started_blocks,
    uses_target_embedding,
)


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
            "layers_per_block": families.layer_allocation(cfg),
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
    layers = families.layer_allocation(run.config)[0]
    steps = d.calibration_steps or min(200, max(20, run.config.train.steps // 2))  # scaled to the training budget
    log(f"[prepare] calibrating the noise partition: a {layers}-layer denoiser, {steps} steps")
    curve = measure_loss_curve(run, steps, layers, log=log)
    proposals = propose(curve, d.num_blocks, d.P_mean, d.P_std)
    chosen = {k: v for k, v in proposals[d.calibration].items() if k != "boundaries_implied"}
    run = set_partition(run, chosen, {"method": d.calibration, "curve": curve, "proposals": proposals})
    bounds = [round(b, 4) for b in run.manifest["partition"]["sigma_boundaries"]]
    log(f"[prepare] partition '{d.calibration}': sigma boundaries {bounds}")
    return run
