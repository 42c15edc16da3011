"""Streaming prepare: a killed prepare resumes to the same bytes, worker count changes no hash, streaming `datasets`
sources, a split that survives appended documents, and bad input deep in a corpus."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dbscale.create_run import prepare_run
from dbscale.data.sources import load_split_documents
from dbscale.errors import DataError
from dbscale.families import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def quiet(*args):
    pass


def write_corpus(path: Path, speeches, docs: int) -> Path:
    """A .jsonl corpus of `docs` documents of realistic length: paragraphs of the speeches, a few per document."""
    paragraphs = [p for f in speeches for p in f.read_text().split("\n\n") if p.strip()]
    with open(path, "w") as f:
        for i in range(docs):
            text = "\n\n".join(paragraphs[(i * 3 + j) % len(paragraphs)] for j in range(1 + i % 4))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def corpus_config(paths, **data) -> dict:
    return {
        "name": "prepare-test",
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 32},
        "diffusion": {"num_blocks": 2},
        "data": {
            "source": "files",
            "paths": [str(p) for p in paths],
            "vocab_size": 400,
            "shard_tokens": 20_000,
            "tokenizer_train_chars": 300_000,
            **data,
        },
        "train": {"steps": 2, "micro_batch": 2, "warmup_steps": 0},
    }


def shard_bytes(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "data").glob("*.bin"))}


def same_run(a, b) -> None:
    """Two prepares of one corpus: every shard byte for byte, the tokenizer, the config and the manifest (all but
    the run id and creation time, unique per run by design)."""
    assert shard_bytes(a.root) == shard_bytes(b.root) and len(shard_bytes(a.root)) > 3
    for rel in ("config.yaml", a.tokenizer_file):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    strip = lambda m: {k: v for k, v in m.items() if k not in ("run_id", "created")}  # noqa: E731
    assert strip(a.manifest) == strip(b.manifest)


@pytest.fixture
def corpus(tmp_path, speeches):
    return write_corpus(tmp_path / "corpus.jsonl", speeches[:40], 3000)


def test_worker_count_changes_no_hash(corpus, tmp_path):
    one = prepare_run(config_from_dict(corpus_config([corpus], num_workers=1)), tmp_path / "one", log=quiet)
    two = prepare_run(config_from_dict(corpus_config([corpus], num_workers=2)), tmp_path / "two", log=quiet)
    same_run(one, two)
    assert yaml.safe_load((two.root / "config.yaml").read_text())["data"]["num_workers"] is None  # not frozen
    logs = []  # preparing again with another worker count is the same run
    prepare_run(config_from_dict(corpus_config([corpus], num_workers=2)), one.root, log=logs.append)
    assert any("already prepared with this config" in m for m in logs)


def test_a_prepare_killed_mid_corpus_resumes_to_the_same_bytes(corpus, tmp_path):
    cfg = config_from_dict(corpus_config([corpus], num_workers=1))
    whole = prepare_run(cfg, tmp_path / "whole", log=quiet)
    total = len(whole.manifest["data"]["train"])
    (tmp_path / "cfg.yaml").write_text(json.dumps(corpus_config([corpus], num_workers=2)))
    cmd = [sys.executable, "tools/prepare.py", "--config", str(tmp_path / "cfg.yaml"), "--run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    journal = tmp_path / ".killed.preparing" / "prepare.json"
    p = subprocess.Popen([*cmd, str(tmp_path / "killed")], cwd=ROOT, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    done = 0
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        try:
            done = len(json.loads(journal.read_text()).get("shards", {}).get("train", []))
        except (OSError, ValueError):
            done = 0
        if done >= 3:
            os.killpg(p.pid, signal.SIGKILL)  # the prepare and its tokenizer workers, mid-corpus
            break
        time.sleep(0.005)
    p.wait()
    assert 3 <= done < total, f"the prepare was not caught mid-corpus ({done} of {total} shards)"
    assert not (tmp_path / "killed").exists()  # never a half-prepared run
    resumed = subprocess.run([*cmd, str(tmp_path / "killed")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming an interrupted prepare: train after shard" in resumed.stdout + resumed.stderr
    from dbscale.run import open_run

    same_run(open_run(tmp_path / "killed"), whole)
    assert not (tmp_path / ".killed.preparing").exists()


def test_streaming_datasets_sources_give_the_files_source_shards(corpus, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files = prepare_run(config_from_dict(corpus_config([corpus])), tmp_path / "files", log=quiet)
    hf = {"source": "hf", "hf_path": "json", "hf_data_files": [str(corpus)], "hf_streaming": True}
    streamed = prepare_run(config_from_dict(corpus_config([], **hf)), tmp_path / "streamed", log=quiet)
    assert shard_bytes(streamed.root) == shard_bytes(files.root)
    saved = tmp_path / "saved"
    datasets.load_dataset("json", data_files={"train": [str(corpus)]}, split="train").save_to_disk(str(saved))
    hf = {"source": "hf", "hf_path": str(saved), "hf_streaming": True}
    from_disk = prepare_run(config_from_dict(corpus_config([], **hf)), tmp_path / "from_disk", log=quiet)
    assert shard_bytes(from_disk.root) == shard_bytes(files.root)


def test_appended_documents_leave_every_earlier_split_unchanged(tmp_path, speeches):
    small = write_corpus(tmp_path / "small.jsonl", speeches[:10], 200)
    grown = tmp_path / "grown.jsonl"
    extra = write_corpus(tmp_path / "extra.jsonl", speeches[10:20], 77)
    grown.write_text(small.read_text() + extra.read_text())
    before = load_split_documents(config_from_dict(corpus_config([small])).data, quiet)
    after = load_split_documents(config_from_dict(corpus_config([grown])).data, quiet)
    for split in (0, 1):  # each split of the grown corpus starts with the small corpus's split, in order
        assert after[split][: len(before[split])] == before[split] and len(after[split]) > len(before[split])
    assert len(before[1]) == 10  # floor(200 * 0.05 + 0.95)


def test_a_bad_line_deep_in_a_corpus_names_file_and_line_and_keeps_the_shards(corpus, tmp_path):
    lines = corpus.read_text().splitlines(keepends=True)
    good = "".join(lines)
    lines[2500] = '{"text": "a line cut short\n'
    corpus.write_text("".join(lines))
    cfg = config_from_dict(corpus_config([corpus], num_workers=1))
    with pytest.raises(DataError, match=r"corpus.jsonl:2501: expected a JSON object with a string 'text' field") as e:
        prepare_run(cfg, tmp_path / "run", log=quiet)
    assert "data.bad_documents: skip" in str(e.value) and not (tmp_path / "run").exists()
    kept = list((tmp_path / ".run.preparing" / "data").glob("train_*.bin"))
    assert len(kept) >= 3  # the shards finished before the bad line wait for the resume

    skipping = corpus_config([corpus], num_workers=1, bad_documents="skip")
    logs = []
    prepare_run(config_from_dict(skipping), tmp_path / "skipped", log=logs.append)
    assert any("left out 1 bad document(s)" in m and "corpus.jsonl:2501" in m for m in logs)

    corpus.write_text(good)  # the line repaired: the same config resumes after the kept shards
    logs = []
    run = prepare_run(cfg, tmp_path / "run", log=logs.append)
    assert any("resuming an interrupted prepare" in m for m in logs)
    same_run(run, prepare_run(cfg, tmp_path / "fresh", log=quiet))


def test_a_resume_over_a_changed_source_is_refused(corpus, tmp_path):
    lines = corpus.read_text().splitlines(keepends=True)
    lines[2500] = "not json\n"
    corpus.write_text("".join(lines))
    cfg = config_from_dict(corpus_config([corpus], num_workers=1))
    with pytest.raises(DataError, match="corpus.jsonl:2501"):
        prepare_run(cfg, tmp_path / "run", log=quiet)
    lines[3] = json.dumps({"text": "an earlier document, edited"}) + "\n"
    lines[2500] = json.dumps({"text": "repaired"}) + "\n"
    corpus.write_text("".join(lines))
    with pytest.raises(DataError, match="differ from those the interrupted prepare read: the source changed"):
        prepare_run(cfg, tmp_path / "run", log=quiet)
    assert list((tmp_path / ".run.preparing" / "data").glob("train_*.bin"))  # refused: nothing removed


def test_an_undecodable_file_is_named_with_its_line(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"{i:02d}.txt").write_text(f"document {i}\n" * 50)
    (docs / "07.txt").write_bytes(b"fine line\nsecond line\ncaf\xe9 in latin-1\n")
    cfg = config_from_dict(corpus_config([docs]))
    with pytest.raises(DataError, match=r"07.txt:3: not UTF-8 text \(byte 0xe9.*iconv"):
        load_split_documents(cfg.data, quiet)
    skip = config_from_dict(corpus_config([docs], bad_documents="skip"))
    train, val = load_split_documents(skip.data, quiet)
    assert len(train) + len(val) == 11
