"""Verified DeepSpeed checkpoints.

A job directory holds `global_stepN/` tags written by `engine.save_checkpoint`, plus dbscale's own:
- `global_stepN/dbscale.json`: written LAST, after every rank has written its shards: run id, block, step,
  world size, ZeRO stage and the size and sha256 of every file in the tag. A tag without it is unfinished.
- `latest`: the newest complete tag, moved (atomically) only after its marker exists.

Loading checks the marker, the run id, every file's size and hash, and screens every pickle for globals
outside torch's weights_only allowlist (plus four DeepSpeed data classes) before DeepSpeed unpickles
anything; a damaged newest tag falls back to the previous one, a malicious or foreign one stops the job.

DeepSpeed itself never reads a job directory: its loaders glob a tag for `*_model_states.pt` and
`*_optim_states.pt` and would unpickle any file planted beside the listed ones. They are given
`verified_view`, a private directory holding exactly the files the marker lists, and run under
`weights_only_loads`, which turns every torch.load (DeepSpeed passes weights_only=False) into a weights_only
load with DeepSpeed's data classes allowed. Either alone stops a planted pickle; together they close the class.

`Checkpointer` is a training job's use of all this across its ranks: plan the resume before the engine exists
(which tag, which LR schedule, whether to re-shard for another process count), load it, save and publish.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import uuid
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from dbscale.errors import CheckpointError
from dbscale.files import atomic_write_json, atomic_write_text, read_json, sha256_file
from dbscale.train.lock import process_alive

MARKER = "dbscale.json"
LATEST = "latest"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def rank_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a tag that this rank wrote (rank 0 also owns the files not named by rank)."""
    mine = []
    for f in sorted(tag_dir.iterdir()):
        if not f.is_file() or f.name == MARKER:
            continue
        m = re.search(r"zero_pp_rank_(\d+)_", f.name)
        owner = int(m.group(1)) if m else 0
        if owner == rank:
            mine.append(f)
    return mine


def hash_files(files: list[Path]) -> dict[str, dict]:
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}


def hash_files_under(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file under root, keyed by relative path."""
    return {n: {"bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)} for n in tree_files(root)}


def write_marker(job_dir: Path, tag: str, identity: dict, files: dict[str, dict]) -> None:
    atomic_write_json(job_dir / tag / MARKER, {**identity, "tag": tag, "files": files, "complete": True})


def write_latest(job_dir: Path, tag: str) -> None:
    atomic_write_text(job_dir / LATEST, tag)


@dataclass
class CheckpointInfo:
    tag: str
    step: int
    marker: dict
    path: Path
    # (device, inode, size, mtime) of every listed file when it was verified: what verified_view stages
    identities: dict | None = None


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def verify_tag(job_dir: Path, tag: str, run_id: str | None = None, block=None) -> CheckpointInfo:
    """Raise CheckpointError naming the file if a tag is unfinished, damaged or from another run/block."""
    tag_dir = job_dir / tag
    marker_path = tag_dir / MARKER
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: checkpoint directory missing.")
    if not marker_path.is_file():
        raise CheckpointError(f"{tag_dir}: unfinished checkpoint (no {MARKER}); the job stopped while saving.")
    try:
        marker = read_json(marker_path, "checkpoint marker")
    except Exception as e:
        raise CheckpointError(str(e)) from None
    if run_id is not None and marker.get("run_id") != run_id:
        raise CheckpointError(
            f"{tag_dir}: checkpoint belongs to run {marker.get('run_id')}, not to this run ({run_id}). "
            "Fix: move it out of this run directory; a block's checkpoints are only valid in their own run."
        )
    if block != "any" and marker.get("block") != block:
        raise CheckpointError(f"{tag_dir}: checkpoint is of block {marker.get('block')}, expected {block}.")
    present = tree_files(tag_dir)
    unlisted = sorted(name for name in present if name != MARKER and name not in marker["files"])
    if unlisted:
        more = f" (and {len(unlisted) - 1} more: {', '.join(unlisted[1:])})" if len(unlisted) > 1 else ""
        raise CheckpointError(
            f"{tag_dir / unlisted[0]}: refused: this file is not one the job wrote into checkpoint {tag} (its "
            f"{MARKER} lists every file it saved){more}; it may be malicious. Nothing was loaded. Fix: delete it, "
            "then rerun."
        )
    identities = {}
    for name, rec in marker["files"].items():
        f = tag_dir / name
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(part in ("", ".", "..") for part in parts):
            raise CheckpointError(f"{marker_path}: lists '{name}', which is not a file name of this tag.")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from checkpoint {tag}.")
        identities[name] = _identity(f)
        check_file(f, rec)
    return CheckpointInfo(tag, marker["step"], marker, tag_dir, identities)


def tree_files(root: Path) -> list[str]:
    """Every entry under root that is not a directory, as a relative POSIX path (a universal checkpoint nests)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def check_file(f: Path, rec: dict) -> None:
    """Size, sha256 and (for a pickle) the global screen of one listed file."""
    if f.stat().st_size != rec["bytes"]:
        raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {rec['bytes']} (truncated or replaced).")
    if sha256_file(f) != rec["sha256"]:
        raise CheckpointError(f"{f}: sha256 mismatch (the file was modified or corrupted).")
    if f.name.endswith(".pt"):
        screen_pickle(f)


# Classes a DeepSpeed checkpoint pickles beyond what torch's weights_only loader allows by default. They are
# plain data holders; no other global (os.system, builtins.eval, ...) may appear in a checkpoint.
DEEPSPEED_SAFE_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def screen_pickle(path: Path) -> None:
    """Refuse a torch checkpoint file whose pickle names any global outside torch's weights_only allowlist
    and DEEPSPEED_SAFE_GLOBALS. Scans the opcodes; nothing is unpickled, so nothing can run."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}).") from None
    forbidden = sorted(set(unsafe) - DEEPSPEED_SAFE_GLOBALS)
    if forbidden:
        raise CheckpointError(
            f"{path}: refused: the file would call {forbidden} when loaded, which a checkpoint never needs "
            "(it may be malicious). Nothing was loaded. Fix: delete it and use a checkpoint this run wrote."
        )


def _deepspeed_safe_classes() -> list:
    import importlib

    classes = []
    for dotted in sorted(DEEPSPEED_SAFE_GLOBALS):
        module, name = dotted.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load is a weights_only load (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides an explicit
    weights_only=False, which DeepSpeed's checkpoint loaders pass) that also accepts DEEPSPEED_SAFE_GLOBALS."""
    import torch

    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


VIEW_PREFIX = ".verified-"


@contextmanager
def verified_view(info: CheckpointInfo) -> Iterator[Path]:
    """A private directory beside the tag, `<view>/<tag>/` holding exactly the files the marker lists (hard
    links; copies where the filesystem has none) and `<view>/latest`, for DeepSpeed to read instead of the job
    directory. A staged file that is not the very file `verify_tag` checked (same device, inode, size and
    mtime) is checked again. Removed on exit."""
    job_dir, tag = info.path.parent, info.tag
    view = job_dir / f"{VIEW_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = view / tag
    staged.mkdir(parents=True)
    try:
        for name, rec in info.marker["files"].items():
            target = staged / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(info.path / name, target)
            except OSError:
                shutil.copy2(info.path / name, target)
            if (info.identities or {}).get(name) != _identity(target):
                check_file(target, rec)
        shutil.copy2(info.path / MARKER, staged / MARKER)
        (view / LATEST).write_text(tag)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def remove_stale_views(job_dir: Path) -> None:
    """Views left by a reader on this host that was killed (its process is gone): their hard links would keep
    pruned checkpoints' bytes on disk."""
    host = socket.gethostname()
    views = [v for d in (job_dir, job_dir / UNIVERSAL) if d.is_dir() for v in d.glob(f"{VIEW_PREFIX}{host}-*")]
    for view in views:
        pid = view.name[len(VIEW_PREFIX) + len(host) + 1 :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(view, ignore_errors=True)


def list_tags(job_dir: Path) -> list[str]:
    """Tag directories present, newest step first."""
    if not job_dir.is_dir():
        return []
    tags = [p.name for p in job_dir.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of, reverse=True)


def find_resumable(job_dir: Path, run_id: str, block) -> CheckpointInfo | None:
    """The newest intact checkpoint of this run and block, or None when the job has none yet.

    A damaged or unfinished newer tag is skipped with a warning. Raises when tags exist but none is intact
    (so nothing is silently retrained over), or when any tag belongs to another run.
    """
    problems, unfinished = [], []
    for tag in list_tags(job_dir):  # newest step first; `latest` is a pointer for humans and tools
        if (job_dir / tag).is_dir() and not (job_dir / tag / MARKER).is_file():
            unfinished.append(tag)  # a save that never completed: nothing in it was ever a checkpoint
            continue
        try:
            info = verify_tag(job_dir, tag, run_id, block)
        except CheckpointError as e:
            if "belongs to run" in str(e) or "is of block" in str(e) or "refused:" in str(e):
                raise  # never fall back silently past a foreign or malicious checkpoint
            problems.append(str(e))
            continue
        for p in problems:
            warnings.warn(f"skipping damaged checkpoint: {p} Resuming from {info.path} instead.", stacklevel=2)
        if unfinished:
            warnings.warn(
                f"{job_dir}: skipping unfinished checkpoint(s) {unfinished} (the job stopped while saving). "
                f"Resuming from {info.path}.",
                stacklevel=2,
            )
        return info
    if unfinished and not problems:
        warnings.warn(f"{job_dir}: ignoring unfinished checkpoint(s) {unfinished}: no save completed.", stacklevel=2)
    if problems:
        raise CheckpointError(
            "no intact checkpoint to resume from: " + " | ".join(problems) + f" Fix: restore the files, or "
            f"delete the damaged global_step* directories in {job_dir} to start this job from scratch."
        )
    return None


def prune(job_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete tags (never the one `latest` names)."""
    latest = (job_dir / LATEST).read_text().strip() if (job_dir / LATEST).is_file() else None
    complete = [t for t in list_tags(job_dir) if (job_dir / t / MARKER).is_file()]
    for tag in complete[keep:]:
        if tag != latest:
            shutil.rmtree(job_dir / tag, ignore_errors=True)
    converted = job_dir / UNIVERSAL  # a universal copy is needed until the job has saved a newer checkpoint
    newest = complete[0] if complete else None
    for copy in converted.iterdir() if converted.is_dir() else []:
        if copy.name != newest:
            shutil.rmtree(copy, ignore_errors=True)


def remove_unfinished(job_dir: Path, newer_than: int) -> None:
    """Remove unfinished tags newer than the resume point, so a re-save at that step starts clean."""
    for tag in list_tags(job_dir):
        if step_of(tag) > newer_than and not (job_dir / tag / MARKER).is_file():
            shutil.rmtree(job_dir / tag, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


UNIVERSAL = "universal"  # job_dir/universal/<tag>: a checkpoint converted for another process count


def universal_tag(job_dir: Path, info: CheckpointInfo, run_id: str, block, log=print) -> CheckpointInfo:
    """The checkpoint of `info` in DeepSpeed's universal format (job_dir/universal/<tag>/), which loads under any
    number of processes. Converted once, from the verified view of the original, by DeepSpeed's ds_to_universal
    under weights_only loading; published with a marker of its own (every file hashed), then verified as any tag."""
    root = job_dir / UNIVERSAL
    done = root / info.tag / MARKER
    if not done.is_file():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        root.mkdir(exist_ok=True)
        staging = root / f".{info.tag}.converting-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            log(f"[resume] converting {info.path} ({info.marker['world_size']} process(es)) to a universal checkpoint")
            with verified_view(info) as view, weights_only_loads():
                args = argparse.Namespace(
                    input_folder=str(view / info.tag),
                    output_folder=str(staging),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=True,
                )
                ds_to_universal(args)
            files = hash_files_under(staging)
            identity = {k: v for k, v in info.marker.items() if k not in ("files", "tag", "complete")}
            identity["universal_from"] = {"tag": info.tag, "world_size": info.marker["world_size"]}
            atomic_write_json(staging / MARKER, {**identity, "tag": info.tag, "files": files, "complete": True})
            shutil.rmtree(root / info.tag, ignore_errors=True)
            os.replace(staging, root / info.tag)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return verify_tag(root, info.tag, run_id, block)


class Checkpointer:
    """Save and resume of one training job across its ranks (the trainer's checkpoints, one object).

    `plan` runs before the DeepSpeed engine exists: rank 0 picks the newest verified checkpoint and every rank
    learns the LR schedule to continue with and whether the checkpoint was saved under another process count
    (then it is resumed from its universal form, DeepSpeed re-shards it, with grad_accum scaled so the global
    batch, and so the data stream, stay the same). `resume` loads it through a verified view; `save` writes a
    tag and publishes it (marker, then `latest`) only once every rank has written its shards."""

    def __init__(
        self,
        job_dir: Path,
        run_id: str,
        block: int | None,
        rank: int,
        world: int,
        job: str,
        log,
        tokenizer_sha256: str,
        predecessors: list[dict] | None = None,
    ):
        self.job_dir, self.run_id, self.block, self.rank, self.world = job_dir, run_id, block, rank, world
        self.job, self.log, self.tokenizer_sha256, self.predecessors = job, log, tokenizer_sha256, predecessors
        self.train = None  # the train settings, once planned
        self.schedule, self.universal, self.resumed_from_world, self.extended = None, False, None, None
        self._info = None

    # --- before the engine --------------------------------------------------------------------------------
    def plan(self, train, extra_check=None):
        """Returns the train settings to run with (grad_accum rescaled when resuming on another process count).
        extra_check(info) may refuse a checkpoint (a CheckpointError) before anything is loaded."""
        import torch.distributed as dist

        self.train = train
        choice = [None]
        if self.rank == 0:
            try:
                remove_stale_views(self.job_dir)
                self._info = find_resumable(self.job_dir, self.run_id, self.block)
                if self._info is not None:
                    if extra_check is not None:
                        extra_check(self._info)
                    self._check_resumable(self._info)
                    choice = [self._info.marker]
            except CheckpointError as e:
                choice = [{"error": str(e)}]
        dist.broadcast_object_list(choice, src=0)
        marker = choice[0]
        if marker is not None and "error" in marker:
            raise CheckpointError(marker["error"])
        self.schedule = self._schedule_after(marker)
        self.universal = marker is not None and marker["world_size"] != self.world
        if self.universal:
            saved = marker["world_size"] * marker.get("grad_accum", train.grad_accum)
            self.train = dataclasses.replace(train, grad_accum=saved // self.world)
            self.resumed_from_world = marker["world_size"]
        return self.train

    def _schedule_after(self, marker: dict | None) -> dict:
        """The LR schedule to continue with: the checkpoint's, plus an extension when train.steps grew past it."""
        from dbscale.train.deepspeed_config import lr_lambda

        steps = self.train.steps
        if marker is None:
            return {"steps": steps, "extensions": []}
        schedule = marker.get("schedule") or {"steps": steps, "extensions": []}  # (checkpoints before schedules)
        end = schedule["extensions"][-1][1] if schedule["extensions"] else schedule["steps"]
        if steps > end and marker["step"] < steps:
            start = lr_lambda(self.train, schedule)(marker["step"])
            schedule = {**schedule, "extensions": [*schedule["extensions"], [marker["step"], steps, start]]}
            self.extended = (marker["step"], end, steps, start)
        return schedule

    def _check_resumable(self, info: CheckpointInfo) -> None:
        saved_world, saved_stage = info.marker["world_size"], info.marker["zero_stage"]
        global_batch = saved_world * info.marker.get("grad_accum", self.train.grad_accum)
        fixes = []
        if global_batch % self.world:
            fixes.append(
                f"relaunch with a process count that divides the global batch of {global_batch} micro-batches "
                f"({saved_world} process(es) x {global_batch // saved_world} accumulation steps), so it can stay "
                f"the same (this job has {self.world})"
            )
        if saved_stage != self.train.zero_stage:
            fixes.append(
                f"resume at ZeRO stage {saved_stage}: drop the --set train.zero_stage={self.train.zero_stage} "
                f"override (or pass --set train.zero_stage={saved_stage})"
            )
        if fixes:
            raise CheckpointError(
                f"{info.path}: saved with {saved_world} process(es) at ZeRO stage {saved_stage}; this job has "
                f"{self.world} at stage {self.train.zero_stage}. Nothing was loaded. Fix: " + "; and ".join(fixes) + "."
            )

    # --- with the engine ----------------------------------------------------------------------------------
    def identity(self, step: int) -> dict:
        """What a checkpoint records about the job that wrote it (the marker's fields, DeepSpeed's client state)."""
        identity = {
            "run_id": self.run_id,
            "block": self.block,
            "step": step,
            "world_size": self.world,
            "grad_accum": self.train.grad_accum,
            "schedule": self.schedule,
            "zero_stage": self.train.zero_stage,
            "tokenizer_sha256": self.tokenizer_sha256,
        }
        if self.predecessors is not None:  # a stacked block: the weights of the blocks it reads
            identity["predecessors"] = self.predecessors
        return identity

    def _gather_failures(self, failures: list[str]) -> list[str]:
        import torch.distributed as dist

        everyone = [None] * self.world
        dist.all_gather_object(everyone, failures)
        return [f for part in everyone for f in part]

    def resume(self, engine) -> int:
        """Load the checkpoint `plan` chose; returns the step to continue from (0 if none).

        Rank 0 stages a view holding the verified, listed files alone (converted to the universal format first when
        the process count changed); every rank loads from that view with weights_only loading, so no file planted
        in the job directory is ever read."""
        import torch.distributed as dist
        from tqdm import tqdm

        choice = [None]
        views = ExitStack()
        if self.rank == 0 and self._info is not None:
            try:
                info = self._info
                if self.universal:
                    info = universal_tag(self.job_dir, info, self.run_id, self.block, log=tqdm.write)
                view = views.enter_context(verified_view(info))
                choice = [(info.tag, info.marker, str(view))]
            except CheckpointError as e:
                choice = [("error", str(e), None)]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        tag, marker, view = choice[0]
        if tag == "error":
            raise CheckpointError(marker)
        with views:
            try:
                with weights_only_loads():
                    engine.load_checkpoint(view, tag=tag)
                failure = None
            except Exception as e:  # what DeepSpeed or torch's weights_only loader refuse
                failure = f"{type(e).__name__}: {str(e)[:300]}"
            failures = [f for f in self._gather_failures([failure] if failure else []) if f]
        if failures:
            raise CheckpointError(
                f"{self.job_dir / tag}: the checkpoint could not be loaded ({failures[0]}); nothing was changed. "
                f"Fix: move {tag} out of {self.job_dir} to resume from the one before it (or to start over)."
            )
        if self.rank == 0:
            remove_unfinished(self.job_dir, marker["step"])
        if self.extended:
            at, old_end, new_end, start = self.extended
            self.log("extended", at, from_steps=old_end, to_steps=new_end, lr_multiplier=start)
            tqdm.write(
                f"[{self.job}] train.steps {old_end} -> {new_end}: from step {at} the learning rate decays from "
                f"{start * self.train.lr:.3g} (where it is) to the minimum at step {new_end}"
            )
        if self.universal:
            self.log(
                "resharded",
                int(marker["step"]),
                from_world_size=self.resumed_from_world,
                world_size=self.world,
                grad_accum=self.train.grad_accum,
            )
        return int(marker["step"])

    def save(self, engine, step: int) -> None:
        """Write a checkpoint and publish it (marker, then `latest`). If writing fails on any rank (a full
        disk, a quota), the partial tag is removed, `latest` still names the previous checkpoint, and the
        job stops with a CheckpointError."""
        import torch.distributed as dist
        from tqdm import tqdm

        tag = tag_for(step)
        tag_dir = self.job_dir / tag
        if self.rank == 0 and tag_dir.exists():  # a damaged or unfinished tag at this step: replace it
            shutil.rmtree(tag_dir)
        dist.barrier()
        failure = None
        try:
            engine.save_checkpoint(str(self.job_dir), tag=tag, client_state=self.identity(step), save_latest=False)
            files = hash_files(rank_files(tag_dir, self.rank))
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            failure, files = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", {}
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (str(failure) if failure else None, files))
        failures = [f for f, _ in gathered if f]
        if self.rank == 0 and not failures:
            try:
                merged = {k: v for _, part in gathered for k, v in part.items()}
                write_marker(self.job_dir, tag, self.identity(step), merged)
                write_latest(self.job_dir, tag)
                fsync_dir(self.job_dir)
            except OSError as e:
                failures.append(str(e))
                (tag_dir / MARKER).unlink(missing_ok=True)
        failures = [f for f in self._gather_failures(failures) if f]
        if failures:
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
                self.log("checkpoint_failed", step, tag=tag, error=failures[0])
            previous = (self.job_dir / LATEST).read_text().strip() if (self.job_dir / LATEST).is_file() else None
            raise CheckpointError(
                f"{tag_dir}: could not write the checkpoint ({failures[0]}). The previous checkpoint "
                f"({previous or 'none'}) is intact and the job stops here. Fix: free disk space, then rerun the "
                "same command to resume."
            )
        if self.rank == 0:
            prune(self.job_dir, self.train.keep_checkpoints)
            self.log("checkpoint", step, tag=tag)
            tqdm.write(f"[{self.job}] step {step}: checkpoint {self.job_dir / tag}")
        dist.barrier()
