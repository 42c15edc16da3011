"""A corpus to a run's tokenizer and shards in bounded memory, on every core, resumable at the last shard.

Documents stream from the source (DocumentStream) twice: once for the tokenizer's training sample (the first
data.tokenizer_train_chars characters of the training split, then the pass stops), once to tokenize. The second
pass hands batches of documents to `data.num_workers` processes and writes their token ids in the stream's order,
so the shards do not depend on the worker count or on timing. No more than a few batches are in flight at once.

A shard is written under a temporary name, flushed and renamed; then the journal (prepare.json in the staging
directory) records it with the stream position after it (the split's document index and how many of that
document's tokens the shard already holds). A killed prepare resumes there: documents before the position are
read but not tokenized again, and every recorded shard is checked against its hash first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from dbscale.config import DataConfig
from dbscale.data.shards import ShardWriter, token_dtype
from dbscale.data.sources import DocumentStream, normalized, split_error
from dbscale.data.tokenizer import CharTokenizer, load_tokenizer, train_sentencepiece
from dbscale.errors import DataError
from dbscale.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_file

JOURNAL = "prepare.json"
TOKENIZER = "tokenizer/spm.model"
CHAR_TOKENIZER = "tokenizer/chars.json"
BATCH_CHARS = 1 << 20  # characters per batch handed to a worker (a longer document goes alone)
BATCH_DOCS = 512
SPLITS = ("train", "val")


# --------------------------------------------------------------------------------------------------------
# The tokenizer.


def fit_tokenizer(data: DataConfig, stream: DocumentStream, staging: Path, log=print) -> str:
    """Write the run's tokenizer into `staging` and return its path there: a char alphabet, a copy of
    data.tokenizer_model, or a sentencepiece model fit on the first data.tokenizer_train_chars characters of the
    training documents (read from the stream, which stops there)."""
    if data.tokenizer_type == "char":
        atomic_write_text(staging / CHAR_TOKENIZER, CharTokenizer(data.alphabet).to_json())
        return CHAR_TOKENIZER
    if data.tokenizer_model:
        source = Path(data.tokenizer_model)
        if not source.is_file():
            raise DataError(f"data.tokenizer_model: {source} does not exist.")
        log(f"[prepare] using the tokenizer {source}")
        atomic_write_bytes(staging / TOKENIZER, source.read_bytes())
        return TOKENIZER
    log(
        f"[prepare] training a {data.tokenizer_type} tokenizer, vocab {data.vocab_size}, on the first "
        f"{data.tokenizer_train_chars:,} characters of the training documents ..."
    )
    texts = (normalized(doc.text, data) for split, doc in stream.split(sample=True) if split == "train")
    model = train_sentencepiece(texts, data.vocab_size, data.tokenizer_type, data.tokenizer_train_chars)
    atomic_write_bytes(staging / TOKENIZER, model)
    return TOKENIZER


# --------------------------------------------------------------------------------------------------------
# Workers: each loads the run's tokenizer once and turns texts into token ids.

_worker: dict = {}


def _init_worker(tokenizer_path: str, data: DataConfig, dtype: str) -> None:
    _worker.update(tok=load_tokenizer(tokenizer_path), data=data, dtype=np.dtype(dtype))


def _encode(texts: list[str]) -> list[tuple[np.ndarray, dict]]:
    """(ids, characters outside a char tokenizer's alphabet with counts) per text, as the run's training text is
    made (data.normalize; out-of-alphabet characters become spaces, counted, whatever data.out_of_vocab says:
    the caller refuses)."""
    tok, data, dtype = _worker["tok"], _worker["data"], _worker["dtype"]
    out = []
    for text in texts:
        text = normalized(text, data)
        oov: dict = {}
        if isinstance(tok, CharTokenizer):
            try:
                ids = tok.encode(text)
            except DataError:
                oov = tok.out_of_vocab([text])
                ids = tok.encode(tok.map_out_of_vocab(text))
        else:
            ids = tok.encode(text)
        out.append((np.asarray(ids, dtype=dtype), oov))
    return out


class _Ready:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Inline:
    """The worker pool's interface for one worker: encode in this process."""

    def __init__(self, *init_args):
        _init_worker(*init_args)

    def apply_async(self, fn, args):
        return _Ready(fn(*args))

    def close(self):
        _worker.clear()

    terminate = join = close


def _pool(workers: int, init_args):
    if workers == 1:
        return _Inline(*init_args)
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)


def _finished_shards(out_dir: Path, records: list[dict], log) -> list[dict]:
    """The longest prefix of journal records whose files are there with the recorded size and hash."""
    good = []
    for rec in records:
        path = out_dir / rec["file"]
        if not path.is_file() or sha256_file(path) != rec["sha256"]:
            log(f"[prepare] {path}: missing or changed since it was recorded; writing it again")
            break
        good.append(rec)
    return good


# --------------------------------------------------------------------------------------------------------
# Progress.


class Progress:
    """Bytes of the source read (of the total, when known), documents/s, tokens/s and an ETA: a bar on a
    terminal, else one log line every `every` seconds (a batch job's log)."""

    def __init__(self, total_bytes: int | None, log, every: float = 30.0):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_bytes, desc="[prepare] tokenizing", unit="B", unit_scale=True, mininterval=1.0, disable=None
        )
        self.total, self.log, self.every = total_bytes, log, every
        self.t0 = self.last = time.time()
        self.bytes = self.docs = self.tokens = 0

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        now = time.time()
        rate = (self.docs / max(now - self.t0, 1e-9), self.tokens / max(now - self.t0, 1e-9))
        if not self.bar.disable:
            self.bar.set_postfix_str(f"{rate[0]:,.0f} doc/s, {rate[1]:,.0f} tok/s", refresh=False)
            self.bar.update(nbytes)
        elif now - self.last >= self.every:
            self.last = now
            eta = ""
            if self.total:
                left = (self.total - self.bytes) / max(self.bytes / (now - self.t0), 1e-9)
                eta = f" of {self.total / 1e6:,.0f} MB ({100 * self.bytes / self.total:.0f}%, ETA {left:,.0f}s)"
            self.log(
                f"[prepare] tokenizing: {self.bytes / 1e6:,.1f} MB read{eta}, {self.docs:,} documents "
                f"({rate[0]:,.0f}/s), {self.tokens:,} tokens ({rate[1]:,.0f}/s)"
            )

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------------
# The tokenizing pass.


def tokenize_corpus(data: DataConfig, stream: DocumentStream, staging: Path, tok_rel: str, journal: dict, log=print):
    """Tokenize the stream into staging/data, resuming after the shards `journal` records (updated as shards
    finish). Returns ({dtype, train, val} for the manifest, {split: characters}) ."""
    tok = load_tokenizer(staging / tok_rel)
    dtype = token_dtype(tok.vocab_size)
    out_dir = staging / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    journal.setdefault("shards", {s: [] for s in SPLITS})

    def save_journal():
        journal["shards"] = {s: w.records for s, w in writers.items()}
        atomic_write_json(staging / JOURNAL, journal)

    writers = {
        s: ShardWriter(
            out_dir,
            s,
            data.shard_tokens,
            tok.document_separator,
            dtype,
            _finished_shards(out_dir, journal["shards"].get(s, []), log),
            save_journal,
        )
        for s in SPLITS
    }
    resumed = {s: w.records for s, w in writers.items() if w.records}
    if resumed:
        where = ", ".join(f"{s} after shard {len(r)} (document {r[-1]['next_doc']})" for s, r in resumed.items())
        log(f"[prepare] resuming an interrupted prepare: {where}")
    workers = data.num_workers or os.cpu_count() or 1
    log(f"[prepare] tokenizing with {workers} worker process(es) into shards of {data.shard_tokens:,} tokens ...")
    pool = _pool(workers, (str(staging / tok_rel), data, dtype.name))
    progress = Progress(stream.total_bytes, log)
    chars = dict.fromkeys(SPLITS, 0)
    docs = dict.fromkeys(SPLITS, 0)
    oov: Counter = Counter()
    in_flight: deque = deque()

    def drain_one():
        meta, result, nbytes = in_flight.popleft()
        tokens = 0
        for (split, index), (ids, bad) in zip(meta, result.get()):
            writers[split].add(index, ids)
            oov.update(bad)
            tokens += ids.size
        progress.update(nbytes, len(meta), tokens)

    t0 = time.time()
    try:
        meta, texts, size, nbytes = [], [], 0, 0
        for split, doc in stream.split():
            index = docs[split]
            docs[split] += 1
            chars[split] += len(doc.text)
            nbytes += doc.nbytes
            if not writers[split].see(index, doc.text):
                continue
            meta.append((split, index))
            texts.append(doc.text)
            size += len(doc.text)
            if size >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                in_flight.append((meta, pool.apply_async(_encode, (texts,)), nbytes))
                meta, texts, size, nbytes = [], [], 0, 0
                while len(in_flight) > 2 * workers:  # bounded: a few batches per worker, never the corpus
                    drain_one()
        if texts or nbytes:
            in_flight.append((meta, pool.apply_async(_encode, (texts,)), nbytes))
        while in_flight:
            drain_one()
        pool.close()
    except BaseException:
        pool.terminate()
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        pool.join()
        progress.close()
    if stream.skipped:
        more = f" and {len(stream.skipped) - 5} more" if len(stream.skipped) > 5 else ""
        listing = ", ".join(stream.skipped[:5]) + more
        log(f"[prepare] left out {len(stream.skipped)} bad document(s) (data.bad_documents: skip): {listing}")
    if oov:
        listing = ", ".join(f"{c!r} x{n}" for c, n in list(oov.most_common())[:20])
        more = f" and {len(oov) - 20} more" if len(oov) > 20 else ""
        summary = f"{sum(oov.values())} characters of {len(oov)} kinds outside the alphabet: {listing}{more}"
        if resumed:
            summary += " (in the documents tokenized since the resume)"
        if data.out_of_vocab == "refuse":  # the config must change: nothing here is worth resuming
            shutil.rmtree(out_dir)
            raise DataError(
                f"data: {summary}. No run was made. Fix: set data.normalize: text8 (lowercase, digits spelled out, the "
                "rest spaces), or data.out_of_vocab: map (each becomes a space), or extend data.alphabet."
            )
        log(f"[prepare] mapped {summary} to spaces (data.out_of_vocab: map)")
    records = {s: w.finish() for s, w in writers.items()}
    save_journal()
    n = {s: sum(r["tokens"] for r in records[s]) for s in SPLITS}
    if not n["train"] or not n["val"]:
        raise DataError(split_error(data, docs["train"], docs["val"]))
    log(
        f"[prepare] {n['train']:,} train tokens ({len(records['train'])} shard(s), {docs['train']:,} documents), "
        f"{n['val']:,} validation tokens ({docs['val']:,} documents); {n['train'] / max(chars['train'], 1):.3f} "
        f"tokens/char; {time.time() - t0:.1f}s"
    )
    return {"dtype": dtype.name, **records}, chars


def read_journal(staging: Path, config_text: str, log=print) -> dict:
    """The journal of an interrupted prepare of this config in `staging`, or a fresh one (the staging directory
    emptied first when it holds another config's work)."""
    key = hashlib.sha256(config_text.encode()).hexdigest()
    path = staging / JOURNAL
    if path.is_file():
        journal = read_json(path, "prepare journal")
        if journal.get("config_sha256") == key:
            return journal
        log(f"[prepare] {staging}: holds an unfinished prepare of another config; starting over")
    for child in staging.iterdir():
        if child.name != "job.lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    journal = {"config_sha256": key}
    atomic_write_json(path, journal)
    return journal
