"""The merged model format: one safetensors file plus a manifest, self-contained (tokenizer included).

    R/merged/          the B blocks: keys blocks.{b}.*, plus target_embedding (Gaussian families)
    R/e2e/merged/      the end-to-end baseline: the baseline model's own keys

ZeRO shards (stages 1-3) are consolidated with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`,
only after dbscale has verified the checkpoint's marker, run id and file hashes, and only from a view that
holds the listed files alone, under weights_only loading (dbscale/train/checkpoint.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dbscale.errors import CheckpointError, RunError
from dbscale.files import atomic_write_json, read_json, sha256_file, state_sha256
from dbscale.run import FORMAT_VERSION, TOKENIZER, Run, open_run
from dbscale.train import checkpoint as ckpt

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def consolidate(run: Run, block: int | None, allow_unfinished: bool) -> tuple[dict[str, torch.Tensor], dict]:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    job_dir = run.job_dir(block)
    name = "the end-to-end baseline" if block is None else f"block {block}"
    launch = (
        f"python launchers/train_e2e.py --run {run.root}"
        if block is None
        else f"python launchers/train_block.py --run {run.root} --block {block}"
    )
    info = ckpt.find_resumable(job_dir, run.run_id, block)
    if info is None:
        raise CheckpointError(f"{name}: no checkpoint in {job_dir}. Fix: train it first: {launch}")
    if info.marker.get("tokenizer_sha256") != run.manifest["tokenizer_sha256"]:
        raise CheckpointError(
            f"{info.path}: {name} was trained with another tokenizer (sha256 {info.marker.get('tokenizer_sha256')}). "
            "Fix: retrain this block in this run."
        )
    total = run.config.train.steps
    if info.step < total and not allow_unfinished:
        raise CheckpointError(
            f"{name} is unfinished: its newest checkpoint ({info.path}) is at step {info.step} of {total}. "
            f"Fix: resume it ({launch}), or pass --allow-unfinished to merge it as it is."
        )
    try:
        with ckpt.verified_view(info) as view, ckpt.weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(view), tag=info.tag)
    except CheckpointError:
        raise
    except Exception as e:  # what DeepSpeed or torch's weights_only loader refuse
        raise CheckpointError(
            f"{info.path}: {name}'s checkpoint could not be consolidated ({type(e).__name__}: {str(e)[:300]}). "
            f"Nothing was merged. Fix: resume the job to write a fresh checkpoint ({launch})."
        ) from None
    source = {"tag": info.tag, "step": info.step}
    if info.marker.get("predecessors") is not None:  # a stacked block: the weights of the blocks it read
        source["predecessors"] = info.marker["predecessors"]
    return {k: v.contiguous() for k, v in state.items()}, source


def merge_run(run_dir: str | Path, e2e: bool = False, allow_unfinished: bool = False, log=print) -> Path:
    """Consolidate the blocks (or the baseline) of a run into `merged/` (or `e2e/merged/`)."""
    from safetensors.torch import save_file

    run = open_run(run_dir)
    out = run.root / ("e2e/merged" if e2e else "merged")
    jobs: list[int | None] = [None] if e2e else list(range(run.num_blocks))
    state: dict[str, torch.Tensor] = {}
    sources, hashes = {}, {}
    for job in jobs:
        part, source = consolidate(run, job, allow_unfinished)
        prefix = "" if job is None else f"blocks.{job}."
        state.update({prefix + k: v for k, v in part.items()})
        sources["e2e" if job is None else str(job)] = source
        if not e2e and run.config.diffusion.stack_context:
            hashes[job] = state_sha256(part)
        log(f"[merge] {'e2e' if job is None else f'block {job}'}: {source['tag']} ({len(part)} tensors)")
    if hashes:
        check_stacked_chain({int(b): s for b, s in sources.items()}, hashes, run.root)
    if not e2e and "target_embedding_sha256" in run.manifest:
        state["target_embedding"] = run.load_target_embedding()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merged-", dir=out.parent))
    try:
        save_file(state, str(staging / MODEL_FILE))
        (staging / "tokenizer").mkdir()
        shutil.copy2(run.root / run.tokenizer_file, staging / run.tokenizer_file)
        atomic_write_json(
            staging / MANIFEST_FILE,
            {
                "format_version": FORMAT_VERSION,
                "kind": "e2e" if e2e else "blocks",
                "family": run.config.model.family,
                "run_id": run.run_id,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": run.config.to_dict(),
                "vocab_size": run.vocab_size,
                "partition": run.manifest["partition"],
                "sources": sources,
                "model_sha256": sha256_file(staging / MODEL_FILE),
                "tokenizer_file": run.tokenizer_file,
                "tokenizer_sha256": run.manifest["tokenizer_sha256"],
                "num_parameters": int(sum(v.numel() for k, v in state.items() if k != "target_embedding")),
            },
        )
        if out.exists():  # replace the previous merge only once the new one is complete
            old = out.with_name(out.name + f".old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log(f"[merge] wrote {out / MODEL_FILE}")
    return out


def load_merged(path: str | Path, device: str | torch.device = "cpu", family: str | None = None):
    """Load a merged model. Returns (model, tokenizer, manifest). Verifies hashes; safetensors only.
    With `family`, refuses a model of another family with a message naming both."""
    from safetensors.torch import load_file

    from dbscale import families
    from dbscale.data.tokenizer import load_tokenizer
    from dbscale.families import frozen_config_from_dict

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RunError(
            f"{path}: not a merged model (no {MANIFEST_FILE}). Fix: run tools/merge_blocks.py --run R and pass "
            "R/merged (or R/e2e/merged with --e2e)."
        )
    manifest = read_json(manifest_path, "merged-model manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RunError(f"{manifest_path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}.")
    model_path, tok_path = path / MODEL_FILE, path / manifest.get("tokenizer_file", TOKENIZER)
    for f, key in ((model_path, "model_sha256"), (tok_path, "tokenizer_sha256")):
        if not f.is_file():
            raise RunError(f"{f}: missing. Fix: merge again with tools/merge_blocks.py.")
        if sha256_file(f) != manifest[key]:
            raise RunError(f"{f}: sha256 differs from {manifest_path} (damaged or replaced). Fix: merge again.")
    got = manifest.get("family", "llama")
    if family is not None and got != family:
        raise RunError(
            f"{path}: a merged '{got}' model, but a '{family}' model is needed here (its sampler and weights differ). "
            f"Fix: use this model with the {got} family's tools, or pass a {family} model."
        )
    cfg = frozen_config_from_dict(manifest["config"], where=str(manifest_path))
    model, state = families.get(got).build_merged(cfg, manifest["vocab_size"], manifest, load_file(str(model_path)))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RunError(
            f"{model_path}: weights do not fit the model of its manifest (missing: {result.missing_keys[:8]}, "
            f"unexpected: {result.unexpected_keys[:8]}). Fix: merge again with this dbscale version."
        )
    model.eval().to(device)
    return model, load_tokenizer(tok_path), manifest


def load_ensemble(paths: list[str | Path], mode: str = "product", device: str | torch.device = "cpu"):
    """Merged plain LMs (end-to-end baselines) of one tokenizer as one EnsembleLM (dbscale/models/ensemble.py).
    Returns (model, tokenizer, manifest of the first member with kind 'ensemble' and the members listed)."""
    from dbscale.models.ensemble import EnsembleLM

    if len(paths) < 2:
        raise RunError(f"an ensemble needs at least two merged models, got {len(paths)}: {', '.join(map(str, paths))}")
    members, first, tok = [], None, None
    for path in paths:
        model, tokenizer, manifest = load_merged(path, device)
        if manifest["kind"] != "e2e":
            raise RunError(
                f"{path}: a DiffusionBlocks chain; an ensemble is made of plain LMs (end-to-end baselines, "
                "R/e2e/merged)."
            )
        if first is None:
            first, tok = manifest, tokenizer
        elif manifest["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise RunError(f"{path}: uses another tokenizer than {paths[0]}; ensemble members must share one.")
        members.append(model)
    try:
        ensemble = EnsembleLM(members, mode)
    except ValueError as e:
        raise RunError(str(e)) from None
    return ensemble.eval(), tok, {**first, "kind": "ensemble", "mode": mode, "members": [str(p) for p in paths]}


def check_stacked_chain(markers: dict[int, dict], hashes: dict[int, str], root) -> None:
    """Merge: every stacked block's recorded predecessors are the blocks being merged."""
    for block, marker in sorted(markers.items()):
        for record in marker.get("predecessors") or []:
            b = record["block"]
            if hashes.get(b) != record["sha256"]:
                raise RunError(
                    f"{root}: block {block} was trained on block {b} with weights sha256 "
                    f"{record['sha256'][:12]}, but the block {b} being merged has {str(hashes.get(b))[:12]}: block "
                    f"{b} was retrained after block {block} trained on it. Nothing was merged. Fix: retrain blocks "
                    f"{block}..{max(markers)} in order (dbscale launch --run {root} --local --blocks {block},...), "
                    f"or restore block {b}."
                )
