"""Tokenizers stored in the run: sentencepiece models fit on the training documents, or a fixed character set."""

from __future__ import annotations

import io
import re
from pathlib import Path

import sentencepiece as spm

from dbscale.errors import DataError


def train_sentencepiece(docs: list[str], vocab_size: int, model_type: str, max_chars: int) -> bytes:
    """Fit a sentencepiece model on (up to max_chars of) the documents; returns the serialized model.

    Identity normalisation, no whitespace collapsing and byte fallback make decode(encode(s)) == s for
    any text (the default NFKC normaliser collapses runs of spaces).
    """

    def lines():
        used = 0
        for doc in docs:
            for line in doc.splitlines():
                if line.strip():
                    used += len(line)
                    yield line
                    if used >= max_chars:
                        return

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            num_threads=2,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if needed:
            fix = (
                f" Fix: raise data.vocab_size to at least {int(needed.group(1)) + 8} (byte fallback needs 256 "
                "byte pieces plus one piece per character of the corpus)."
            )
        elif "too high" in msg:
            fix = " Fix: lower data.vocab_size or give more text."
        else:
            fix = ""
        raise DataError(f"data.vocab_size={vocab_size}: sentencepiece training failed: {msg.strip()}.{fix}") from None
    return buf.getvalue()


class Tokenizer:
    """A thin wrapper over a sentencepiece model file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model missing. Fix: re-create the run with tools/prepare.py.")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def document_separator(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class CharTokenizer:
    """One id per character of a fixed alphabet (text8: space + a-z = 27 ids). Stored as tokenizer/chars.json.

    Documents are joined by a space (text8 is one stream of words); there is no EOS. Characters outside the
    alphabet are refused by `check_text` (listed with counts) or mapped to a space, as data.out_of_vocab says.
    """

    FILE = "chars.json"

    def __init__(self, alphabet: str):
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise DataError(f"char tokenizer: alphabet {alphabet!r} must be non-empty without repeats.")
        self.alphabet = alphabet
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.space_id = self.index.get(" ", 0)
        self._ascii_lut = None
        if alphabet.isascii():
            import numpy as np

            self._ascii_lut = np.full(128, -1, dtype=np.int64)
            self._ascii_lut[[ord(c) for c in alphabet]] = np.arange(len(alphabet))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        import json

        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file missing. Fix: re-create the run with tools/prepare.py.")
        try:
            data = json.loads(path.read_text())
            return cls(data["alphabet"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}: not a dbscale char tokenizer (expected {{"alphabet": ...}}).') from None

    def to_json(self) -> str:
        import json

        return json.dumps({"kind": "char", "alphabet": self.alphabet})

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @property
    def eos_id(self) -> None:
        return None

    @property
    def document_separator(self) -> int:
        return self.space_id

    def out_of_vocab(self, texts) -> dict[str, int]:
        """{character: count} of every character outside the alphabet."""
        from collections import Counter

        counts: Counter = Counter()
        for text in texts:
            counts.update(c for c in text if c not in self.index)
        return dict(counts.most_common())

    def map_out_of_vocab(self, text: str) -> str:
        return "".join(c if c in self.index else " " for c in text)

    def encode(self, text: str):
        """Ids of `text` as a numpy array (a 90M-character text8 split stays a compact array)."""
        import numpy as np

        if self._ascii_lut is not None and text.isascii():
            ids = self._ascii_lut[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
            if (ids >= 0).all():
                return ids
        try:
            return np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise DataError(
                f"char tokenizer: character {e.args[0]!r} is not in the alphabet {self.alphabet!r}. Fix: set "
                "data.out_of_vocab: map, or data.normalize: text8, or extend data.alphabet."
            ) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


def load_tokenizer(path: str | Path):
    """The tokenizer stored at `path`: a sentencepiece .model or a char tokenizer's chars.json."""
    path = Path(path)
    return CharTokenizer.load(path) if path.suffix == ".json" else Tokenizer(path)
