"""The k-hop induction heads task (Sanford, Hsu and Telgarsky, "Transformers, parallel computation, and
logarithmic depth", ICML 2024, arXiv 2402.09268) as a generated corpus (data.source: khop).

A sequence x_1..x_N draws symbols of an alphabet of A uniformly with no immediate repeat. With
find(i) = max({0} u {j <= i : x_{j-1} = x_i}) (the position right after the latest earlier occurrence of x_i;
0, a null position, when there is none), hop_k(x)_i = x_{find^k(i)}: k = 1 is the induction head (the symbol
that followed x_i last time), each further hop follows the chain once more. The paper found that a transformer
of width 128 and 4 heads solves hop_k with about log2(k) + 2 layers (2 layers: k = 1; 6 layers: k <= 16).

A document is `k x_1 a_1 x_2 a_2 ... x_N a_N` with a_i = hop_k(x)_i: k as a prefix digit, every symbol followed
by its answer as a character of its own kind (symbols a, b, c, ..., answers A, B, C, ..., '_' for the null
answer), so a next-token model is scored at every answer position. The run's char tokenizer reads it; documents
are joined by a space, so each takes 2N + 2 tokens and a training window of model.seq_len = 2N + 1 (+1) starting
at a document start holds exactly one (data.source khop aligns windows so).
"""

from __future__ import annotations

import hashlib
import string

import numpy as np

from dbscale.errors import DataError

NULL = "_"


def alphabet(symbols: int, max_k: int) -> str:
    """The char tokenizer's alphabet of a k-hop corpus: the separator, symbols, answers, null, k digits."""
    return " " + string.ascii_lowercase[:symbols] + string.ascii_uppercase[:symbols] + NULL + "123456789"[:max_k]


def symbols(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n symbols in [0, size), uniform, none equal to the one before (x_i = x_{i-1} + a nonzero shift mod size)."""
    shifts = rng.integers(1, size, size=n - 1)
    first = rng.integers(size)
    return (first + np.concatenate([[0], np.cumsum(shifts)])) % size


def hop(x: np.ndarray, k: int, size: int) -> np.ndarray:
    """hop_k(x)_i for every i (0-based), the null answer as `size`."""
    n = len(x)
    find = np.full(n, -1, dtype=np.int64)  # -1: the null position
    last: dict[int, int] = {}
    for i in range(n):
        j = last.get(int(x[i]))
        find[i] = -1 if j is None else j + 1
        last[int(x[i])] = i
    pos = np.arange(n)
    for _ in range(k):
        pos = np.where(pos >= 0, find[np.maximum(pos, 0)], -1)
    return np.where(pos >= 0, x[np.maximum(pos, 0)], size)


def document(rng: np.random.Generator, n: int, size: int, max_k: int) -> tuple[str, bytes]:
    """(text, the symbols' fingerprint) of one document with k drawn uniformly in 1..max_k."""
    k = int(rng.integers(1, max_k + 1))
    x = symbols(rng, n, size)
    a = hop(x, k, size)
    lower, upper = string.ascii_lowercase[:size], string.ascii_uppercase[:size] + NULL
    text = str(k) + "".join(lower[s] + upper[t] for s, t in zip(x, a))
    return text, hashlib.blake2b(x.astype(np.uint8).tobytes(), digest_size=8).digest()


def documents(seed: int, n: int, size: int, max_k: int, train: int, val: int):
    """(split, text) of `train` then `val` documents from one seeded generator; a validation document whose symbol
    sequence a training document already has is drawn again, so the splits never share a sequence."""
    rng = np.random.default_rng([seed, 0x6B686F70])
    seen: set[bytes] = set()
    for _ in range(train):
        text, key = document(rng, n, size, max_k)
        seen.add(key)
        yield "train", text
    made, misses = 0, 0
    while made < val:
        text, key = document(rng, n, size, max_k)
        if key in seen:
            misses += 1
            if misses > 10_000:
                raise DataError(
                    f"data.khop_val_documents: {val} validation sequences that no training document has could not "
                    f"be drawn ({size} symbols x {n} positions give {size * (size - 1) ** (n - 1):,} sequences). "
                    "Fix: raise data.khop_symbols, or lower data.khop_documents."
                )
            continue
        misses = 0
        seen.add(key)
        made += 1
        yield "val", text


def answer_positions(length: int) -> np.ndarray:
    """Positions t of a window (t predicts token t + 1) where the next token is an answer: after each symbol."""
    return np.arange(1, length, 2)


def window_stride(data) -> int | None:
    """Where training windows may start in a run's shards: every document start for the k-hop task (each window is
    one whole document), anywhere (None) for text."""
    return 2 * data.khop_symbols + 2 if data.source == "khop" else None
