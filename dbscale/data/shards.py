"""Tokenized memmap shards: documents joined by a separator (EOS, or a space for characters), cut into
fixed-size uint16/uint32 files.

Training draws random windows (seeded by job, step and rank, so a resumed job sees the same data as an
uninterrupted one, with no loader state to save); validation uses a fixed set of windows.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from pathlib import Path

import numpy as np

from dbscale.errors import DataError
from dbscale.files import sha256_file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """One split's shards `{split}_{i:04d}.bin`: documents' ids, each followed by the separator, cut into shards of
    `shard_tokens`, streamed to disk as they come (memory does not grow with the shard size). A shard is written
    under a temporary name, flushed and renamed, then `on_shard` is called (the journal). `done` (from the
    journal) are shards already written: the writer continues after them.

    Each shard record holds the stream position after it (`next_doc`, `skip_tokens`) and the sha256 of the texts of
    the documents before that position (`source_sha256`): a resume over a source whose earlier documents changed
    is refused instead of joining shards of two corpora."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, separator: int, dtype: np.dtype, done, on_shard):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.separator = np.asarray([separator], dtype=dtype)
        self.records = list(done)
        self.on_shard = on_shard
        last = self.records[-1] if self.records else {"next_doc": 0, "skip_tokens": 0}
        self.resume_doc, self.resume_skip = last["next_doc"], last["skip_tokens"]
        self.file = None  # the shard being written: (file object, temporary path, hash), and its token count
        self.count = 0
        self.source = hashlib.sha256()
        self.seen = 0
        self.checked = not self.records
        self.before: deque = deque()  # (document index, source digest before it) of documents not yet written

    def see(self, index: int, text: str) -> bool:
        """Take the next document of this split (its text, before tokenizing) into the source hash; whether it
        still has tokens to write (False for those a resumed prepare has written already)."""
        if index == self.resume_doc:
            self._check_resume()
        if index >= self.resume_doc:
            self.before.append((index, self.source.copy().hexdigest()))
        self.source.update(text.encode("utf-8", "surrogatepass"))
        self.seen = index + 1
        return index >= self.resume_doc

    def _check_resume(self) -> None:
        if self.checked:
            return
        self.checked = True
        if self.seen < self.resume_doc or self.source.hexdigest() != self.records[-1]["source_sha256"]:
            raise DataError(
                f"{self.out_dir}: the {self.split} documents before the resume point (document {self.resume_doc}) "
                "differ from those the interrupted prepare read: the source changed, so its finished shards cannot "
                f"be continued. Nothing was changed. Fix: delete {self.out_dir.parent} to start over (or restore the "
                "source)."
            )

    def add(self, index: int, ids: np.ndarray) -> None:
        """The ids of document `index` (documents in order; an empty one, emptied by normalisation, adds nothing)."""
        if not ids.size:
            return
        ids = np.concatenate([ids, self.separator])
        offset = self.resume_skip if index == self.resume_doc else 0
        while offset < ids.size:
            if self.file is None:
                name = f"{self.split}_{len(self.records):04d}.bin"
                tmp = self.out_dir / f".{name}.tmp"
                self.file, self.count = (open(tmp, "wb"), tmp, hashlib.sha256()), 0
            piece = ids[offset : offset + self.shard_tokens - self.count]
            data = piece.tobytes()
            self.file[0].write(data)
            self.file[2].update(data)
            self.count += piece.size
            offset += piece.size
            if self.count == self.shard_tokens:
                self._close((index, offset) if offset < ids.size else (index + 1, 0))

    def finish(self) -> list[dict]:
        self._check_resume()
        if self.file is not None:
            self._close((self.seen, 0))
        return [{k: r[k] for k in ("file", "tokens", "sha256")} for r in self.records]

    def _close(self, nxt: tuple[int, int]) -> None:
        f, tmp, digest = self.file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = tmp.name[1 : -len(".tmp")]
        os.replace(tmp, self.out_dir / name)
        self.file = None
        while self.before and self.before[0][0] < nxt[0]:
            self.before.popleft()
        source = self.before[0][1] if self.before and self.before[0][0] == nxt[0] else self.source.hexdigest()
        self.records.append(
            {
                "file": name,
                "tokens": self.count,
                "sha256": digest.hexdigest(),
                "next_doc": nxt[0],
                "skip_tokens": nxt[1],
                "source_sha256": source,
            }
        )
        self.on_shard()

    def abort(self) -> None:
        """Close the shard being written without keeping it (its temporary file is rewritten on resume)."""
        if self.file is not None:
            self.file[0].close()
            self.file = None


def write_shards(token_lists, eos_id: int, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype) -> list[dict]:
    """Documents' tokens (each followed by `eos_id`) as shards of one split, in one go; returns the records
    ({file, tokens, sha256}) for the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, split, shard_tokens, eos_id, np.dtype(dtype), [], lambda: None)
    for i, ids in enumerate(token_lists):
        writer.see(i, "")
        writer.add(i, np.asarray(ids, dtype=dtype))
    return writer.finish()


STAMPS = "stamps.json"  # {file: [size, mtime_ns]} of each shard when prepare finished


def write_stamps(data_dir: Path) -> None:
    """Record each shard's size and modification time, so opening the run need not hash shards that are untouched
    (a 9B-token corpus is 18 GB to hash at every job start otherwise)."""
    import json

    stamps = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(data_dir).glob("*.bin"))}
    (Path(data_dir) / STAMPS).write_text(json.dumps(stamps))


def _read_stamps(data_dir: Path) -> dict:
    import json

    try:
        stamps = json.loads((Path(data_dir) / STAMPS).read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}  # none (a run prepared before stamps), or unreadable: every shard is hashed


class TokenShards:
    """Read-only view of one split's shards. Each shard is checked against the manifest when opened: its size
    always; its sha256 unless its size and modification time are those prepare recorded (data/stamps.json), so
    job start does not scale with the corpus while a shard changed in place is still caught."""

    def __init__(self, data_dir: Path, records: list[dict], dtype: str, split: str, verify: bool = True):
        self.split = split
        self.arrays = []
        stamps = _read_stamps(data_dir) if verify else {}
        for rec in records:
            path = Path(data_dir) / rec["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard missing. Fix: re-create the run with tools/prepare.py.")
            expected = rec["tokens"] * np.dtype(dtype).itemsize
            if path.stat().st_size != expected:
                raise DataError(
                    f"{path}: shard is {path.stat().st_size} bytes, the manifest says {expected} (truncated or "
                    "replaced). Fix: re-create the run with tools/prepare.py."
                )
            stat = path.stat()
            untouched = stamps.get(rec["file"]) == [stat.st_size, stat.st_mtime_ns]
            if verify and not untouched and sha256_file(path) != rec["sha256"]:
                raise DataError(
                    f"{path}: sha256 differs from the run manifest (the shard was modified or corrupted). "
                    "Fix: re-create the run with tools/prepare.py."
                )
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.sizes = np.array([a.size for a in self.arrays], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum())

    def _check(self, length: int) -> np.ndarray:
        usable = self.sizes - length
        if (usable < 0).all():
            raise DataError(
                f"the {self.split} split has no shard with {length} tokens (largest: {self.sizes.max()}). "
                "Fix: lower model.seq_len, or give more data / a larger data.val_fraction."
            )
        return np.clip(usable + 1, 0, None)

    def random_windows(self, rng: np.random.Generator, batch: int, length: int, stride: int | None = None):
        """(batch, length) int64 windows at uniformly random offsets (shards weighted by size); with `stride`, at
        offsets that are multiples of it only (one whole document per window when documents have one length)."""
        starts_per_shard = self._check(length)
        if stride:
            starts_per_shard = (starts_per_shard + stride - 1) // stride
        p = starts_per_shard / starts_per_shard.sum()
        shard_ids = rng.choice(len(self.arrays), size=batch, p=p)
        out = np.empty((batch, length), dtype=np.int64)
        for i, s in enumerate(shard_ids):
            start = int(rng.integers(0, starts_per_shard[s])) * (stride or 1)
            out[i] = self.arrays[s][start : start + length]
        return out

    def fixed_windows(self, count: int, length: int, seed: int = 0, stride: int | None = None) -> np.ndarray:
        """A reproducible set of windows for validation."""
        return self.random_windows(np.random.default_rng(seed), count, length, stride)
