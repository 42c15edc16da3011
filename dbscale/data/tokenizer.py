"""Sentencepiece tokenizers: trained in-process on the run's training documents, stored in the run."""

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

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
