"""The k-hop task: the generator against the paper's definition computed literally, splits that share no sequence,
and a run prepared from it whose windows start at document starts."""

import numpy as np
import pytest

from dbscale.data import khop


def hop_by_definition(x, k):
    """hop_k(X)_i = X_{find^k(X, i)}, find(X, i) = max({0} u {j <= i : X_{j-1} = X_i}), 1-based, X_0 = None."""
    X = [None, *[int(v) for v in x]]

    def find(i):
        return max([0] + [j for j in range(1, i + 1) if X[j - 1] == X[i] and X[i] is not None])

    out = []
    for i in range(1, len(X)):
        p = i
        for _ in range(k):
            p = find(p)
        out.append(X[p])
    return out


@pytest.mark.parametrize("alphabet", [2, 4, 7])
def test_hop_matches_the_definition(alphabet):
    rng = np.random.default_rng(alphabet)
    for k in range(1, 9):
        x = khop.symbols(rng, 60, alphabet)
        assert all(a != b for a, b in zip(x, x[1:]))  # no immediate repeat
        expected = [alphabet if v is None else v for v in hop_by_definition(x, k)]
        assert khop.hop(x, k, alphabet).tolist() == expected
    assert khop.hop(np.array([0, 1, 0, 1, 2, 0]), 1, 3).tolist() == [3, 3, 1, 0, 3, 1]


def test_the_splits_share_no_sequence_and_k_is_uniform():
    from dbscale.errors import DataError

    docs = list(khop.documents(seed=0, n=6, size=3, max_k=4, train=60, val=20))  # 96 sequences of 6 symbols
    train = {d[1::2] for s, d in docs if s == "train"}
    val = [d[1::2] for s, d in docs if s == "val"]
    assert len(val) == 20 and not train & set(val) and len(val) == len(set(val))
    with pytest.raises(DataError, match=r"give 2 sequences\). Fix: raise data.khop_symbols"):
        list(khop.documents(seed=0, n=3, size=2, max_k=4, train=40, val=5))  # a b a and b a b only
    many = [d for _, d in khop.documents(seed=1, n=16, size=4, max_k=8, train=4000, val=0)]
    counts = np.bincount([int(d[0]) for d in many], minlength=9)[1:]
    assert counts.min() > 400  # k uniform in 1..8
    assert all(len(d) == 33 for d in many)


def test_a_khop_run_trains_on_whole_documents(tmp_path):
    from dbscale.create_run import prepare_run
    from dbscale.data.khop import window_stride
    from dbscale.errors import ConfigError
    from dbscale.families import config_from_dict

    data = {"source": "khop", "khop_symbols": 8, "khop_documents": 300, "khop_val_documents": 20, "seed": 3}
    data |= {"tokenizer_type": "char", "alphabet": khop.alphabet(4, 8), "vocab_size": 18, "shard_tokens": 18 * 100}
    cfg = {"model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 17}, "diffusion": {"num_blocks": 2}}
    run = prepare_run(config_from_dict({**cfg, "data": data}), tmp_path / "run", log=lambda *a: None)
    tok = run.tokenizer()
    windows = run.shards("train").random_windows(np.random.default_rng(0), 64, 18, window_stride(run.config.data))
    for w in windows:  # a k digit, 8 symbol/answer pairs that agree with hop_k, the separator
        text = tok.decode(w)
        k, pairs = int(text[0]), text[1:17]
        x = np.array(["abcd".index(c) for c in pairs[0::2]])
        assert khop.hop(x, k, 4).tolist() == ["ABCD_".index(c) for c in pairs[1::2]] and text[17] == " "
    val = {tok.decode(w)[1:17:2] for w in run.shards("val").arrays[0].reshape(-1, 18)}
    train = {tok.decode(w)[1:17:2] for a in run.shards("train").arrays for w in a.reshape(-1, 18)}
    assert len(val) == 20 and not val & train
    with pytest.raises(ConfigError, match=r"data.shard_tokens: must be a multiple of a k-hop document's 18"):
        config_from_dict({**cfg, "data": {**data, "shard_tokens": 2000}})
    with pytest.raises(ConfigError, match=r"model.seq_len: 17"):
        config_from_dict({**cfg, "model": {**cfg["model"], "seq_len": 32}, "data": data})
