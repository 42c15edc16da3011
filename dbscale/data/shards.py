"""Tokenized memmap shards: documents joined by a separator (EOS, or a space for characters), cut into
fixed-size uint16/uint32 files.

Training draws random windows (seeded by job, step and rank, so a resumed job sees the same data as an
uninterrupted one, with no loader state to save); validation uses a fixed set of windows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dbscale.errors import DataError
from dbscale.files import sha256_file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_shards(token_lists, eos_id: int, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype) -> list[dict]:
    """Write documents' tokens (each followed by EOS) into shards `{split}_{i:04d}.bin`.

    Each shard is written under a temporary name, flushed and renamed. Returns the shard records
    ({file, tokens, sha256}) for the manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush(chunk: np.ndarray) -> None:
        name = f"{split}_{len(records):04d}.bin"
        tmp = out_dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(chunk.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / name)
        records.append({"file": name, "tokens": int(chunk.size), "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()})

    for ids in token_lists:
        pending.append(np.concatenate([np.asarray(ids, dtype=dtype), np.asarray([eos_id], dtype=dtype)]))
        pending_len += len(ids) + 1
        while pending_len >= shard_tokens:
            joined = np.concatenate(pending)
            flush(joined[:shard_tokens])
            rest = joined[shard_tokens:]
            pending, pending_len = [rest], rest.size
    if pending_len:
        flush(np.concatenate(pending))
    return records


class TokenShards:
    """Read-only view of one split's shards."""

    def __init__(self, data_dir: Path, records: list[dict], dtype: str, split: str, verify: bool = True):
        self.split = split
        self.arrays = []
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
            if verify and sha256_file(path) != rec["sha256"]:
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

    def random_windows(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """(batch, length) int64 windows at uniformly random offsets (shards weighted by size)."""
        starts_per_shard = self._check(length)
        p = starts_per_shard / starts_per_shard.sum()
        shard_ids = rng.choice(len(self.arrays), size=batch, p=p)
        out = np.empty((batch, length), dtype=np.int64)
        for i, s in enumerate(shard_ids):
            start = int(rng.integers(0, starts_per_shard[s]))
            out[i] = self.arrays[s][start : start + length]
        return out

    def fixed_windows(self, count: int, length: int, seed: int = 0) -> np.ndarray:
        """A reproducible set of windows for validation."""
        return self.random_windows(np.random.default_rng(seed), count, length)
