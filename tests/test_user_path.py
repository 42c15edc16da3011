"""A user's own data and settings: one file, a folder, a glob or a .jsonl as the corpus; changing train.steps of
a prepared run; errors that blame the command line when the command line is wrong."""

import json

import pytest

from dbscale.commands.prepare import data_overrides
from dbscale.config import ConfigError
from dbscale.create_run import prepare_run
from dbscale.data.sources import cut_into_documents, load_documents, load_split_documents
from dbscale.errors import DataError, RunError
from dbscale.families import config_from_dict, load_config
from dbscale.run import open_run


def quiet(*args):
    pass


def test_cutting_a_text_keeps_every_piece_in_order():
    pieces = [f"paragraph {i} " + "x" * (i * 37 % 300) for i in range(60)]
    text = "\n\n".join(pieces)
    docs = cut_into_documents(text, "\n\n", 1000)
    assert "\n\n".join(docs) == text  # nothing lost, nothing reordered
    assert all(len(d) <= 1000 or "\n\n" not in d for d in docs)  # only a single long piece may exceed the size
    assert len(docs) >= len(text) // 1000
    assert cut_into_documents("one\n\n\n\ntwo", "\n\n", 3) == ["one", "two"]  # empty pieces are dropped


def test_one_text_file_is_cut_into_documents_and_split(tmp_path, speeches):
    corpus = tmp_path / "book.txt"
    corpus.write_text("\n\n".join(p.read_text() for p in speeches[:3]))
    cfg = config_from_dict({"data": {"source": "files", "paths": [str(corpus)], "document_chars": 5000}}).data
    logs = []
    train, val = load_split_documents(cfg, logs.append)
    assert len(train) + len(val) >= len(corpus.read_text()) // 5000 and len(val) >= 1
    assert any("1 file(s) with 1 document(s): cut into" in m for m in logs)
    never = config_from_dict({"data": {"source": "files", "paths": [str(corpus)], "split_files": "never"}}).data
    with pytest.raises(DataError, match=r"0 training and 1 validation.*both splits need one.*data.split_files: always"):
        load_split_documents(never, quiet)


def test_folders_globs_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.txt").write_text(f"document {i}")
    rows = [{"text": f"row {i}"} for i in range(4)] + [{"text": 5}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    def docs(*paths, **extra):
        data = {"source": "files", "paths": list(paths), "split_files": "never", **extra}
        return load_documents(config_from_dict({"data": data}).data, quiet)

    assert docs(str(tmp_path / "a")) == ["document 0", "document 1", "document 2"]
    assert docs(str(tmp_path / "a" / "*.txt")) == ["document 0", "document 1", "document 2"]
    with pytest.raises(DataError, match="rows.jsonl:5: expected a JSON object with a string 'text' field"):
        docs(str(tmp_path / "rows.jsonl"))  # a row whose text is a number is named, not dropped unseen
    assert docs(str(tmp_path / "rows.jsonl"), bad_documents="skip") == ["row 0", "row 1", "row 2", "row 3"]
    with pytest.raises(DataError, match="rows.jsonl:1: expected a JSON object with a string 'body' field"):
        docs(str(tmp_path / "rows.jsonl"), text_field="body")
    with pytest.raises(DataError, match=r"the pattern '.*\*.md' matches no file"):
        docs(str(tmp_path / "*.md"))


def test_data_option_becomes_config_overrides(tmp_path):
    f = tmp_path / "my corpus.txt"
    f.write_text("x")
    assert data_overrides(str(f)) == ["data.source=files", f"data.paths={json.dumps([str(f)])}"]
    assert data_overrides("books/*.txt")[0] == "data.source=files"
    assert data_overrides("wikitext") == ["data.source=hf", 'data.hf_path="wikitext"']
    with pytest.raises(DataError, match="no such file or folder"):
        data_overrides("./missing.txt")
    cfg = load_config("configs/llama_tiny.yaml", data_overrides(str(f)))
    assert cfg.data.source == "files" and cfg.data.paths == [str(f)]


def test_command_line_mistakes_blame_the_command_line():
    with pytest.raises(ConfigError, match=r"^--set train.stepz: section 'train': unknown key 'stepz'. Did you mean"):
        load_config("configs/llama_tiny.yaml", ["train.stepz=3"])
    with pytest.raises(
        ConfigError, match=r"^--set train.steps \(over configs/llama_tiny.yaml\): .* must be an integer"
    ):
        load_config("configs/llama_tiny.yaml", ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"^configs/llama_tiny.yaml: .*train"):  # a file mistake still names the file
        config_from_dict({"train": {"steps": "abc"}}, where="configs/llama_tiny.yaml")


def test_train_settings_of_a_prepared_run_change_until_a_job_starts(tiny_cfg, tmp_path, process_group):
    from dbscale.train.trainer import Trainer

    run = prepare_run(tiny_cfg(train={"steps": 6}), tmp_path / "run", log=quiet)
    logs = []
    longer = prepare_run(tiny_cfg(train={"steps": 9}), run.root, log=logs.append)
    assert longer.config.train.steps == 9 and longer.run_id == run.run_id
    assert any("no job has started; updated train.steps: 6 -> 9" in m for m in logs)
    open_run(run.root)  # the hashes still verify
    Trainer(open_run(run.root), 0, 0, 1).train()
    with pytest.raises(RunError, match=r"jobs \[0\] have started.*--set train.steps=N.*new --run"):
        prepare_run(tiny_cfg(train={"steps": 12}), run.root, log=quiet)
    with pytest.raises(RunError, match="prepared from another config"):  # other sections never change
        prepare_run(tiny_cfg(train={"steps": 9}, model={"d_model": 64}), run.root, log=quiet)


def test_calibration_budget_follows_the_training_budget(tiny_cfg, tmp_path):
    logs = []
    prepare_run(tiny_cfg(train={"steps": 30}, diffusion={"partition": "calibrated"}), tmp_path / "r", log=logs.append)
    assert any("a 1-layer denoiser, 20 steps" in m for m in logs)  # half of 30 is below the floor of 20


def test_a_run_prepared_by_an_earlier_version_prepares_again_as_a_no_op(tiny_cfg, tmp_path):
    """Fields added to the config since a run was prepared take their defaults, and are no difference."""
    import yaml

    from dbscale.files import sha256_file

    cfg = tiny_cfg(diffusion={"partition": "calibrated", "calibration_steps": 20})
    run = prepare_run(cfg, tmp_path / "run", log=quiet)
    old = yaml.safe_load((run.root / "config.yaml").read_text())
    for key in ("split_files", "document_separator", "document_chars"):  # added after the run was prepared
        del old["data"][key]
    (run.root / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    manifest = json.loads((run.root / "manifest.json").read_text())
    manifest["config_sha256"] = sha256_file(run.root / "config.yaml")
    for key in ("split_files", "document_separator", "document_chars"):
        del manifest["calibration"]["prepared_config"]["data"][key]
    manifest["calibration"]["prepared_config"]["diffusion"]["calibration_steps"] = 200  # an old default
    (run.root / "manifest.json").write_text(json.dumps(manifest))
    logs = []
    again = prepare_run(tiny_cfg(diffusion={"partition": "calibrated"}), run.root, log=logs.append)
    assert again.run_id == run.run_id and any("already prepared with this config" in m for m in logs)


def test_extending_train_steps_continues_the_learning_rate_and_resumes_exactly(tiny_cfg, tmp_path, process_group):
    """Resumed with a larger train.steps, a job's LR continues from where it is and decays to the minimum at the
    new end; the extension is recorded in its checkpoints, so a crash inside it resumes to the same numbers."""
    from dbscale.train.metrics import read_metrics
    from dbscale.train.trainer import Trainer

    def train(run, steps, crash_after=None):
        run.config.train.steps = steps
        trainer = Trainer(run, 0, 0, 1)
        if crash_after is not None:

            def crash(step):
                if step == crash_after:
                    raise KeyboardInterrupt  # a crash right after this step's checkpoint

            trainer.after_step = crash
            with pytest.raises(KeyboardInterrupt):
                trainer.train()
        else:
            trainer.train()

    def lr_and_loss(run):
        by_step = {}
        for e in read_metrics(run.job_dir(0) / "metrics.jsonl"):
            if e["event"] == "train":
                by_step[e["step"]] = (e["lr"], e["loss"])
        return by_step

    runs = []
    for name in ("straight", "crashed"):
        cfg = tiny_cfg(train={"steps": 10, "save_every": 2, "val_every": 0, "log_every": 1, "warmup_steps": 1})
        runs.append(prepare_run(cfg, tmp_path / name, log=quiet))
    straight, crashed = runs
    for run in runs:
        train(run, 10, crash_after=6)  # stopped half-way through its 10 steps, then extended to 14
    train(straight, 14)
    train(crashed, 14, crash_after=10)
    train(crashed, 14)
    a, b = lr_and_loss(straight), lr_and_loss(crashed)
    floor = straight.config.train.lr * straight.config.train.min_lr_ratio
    assert a[6][0] > a[7][0] > a[10][0] > a[13][0] > a[14][0] == pytest.approx(floor)  # decaying to the minimum
    assert a[7][0] > 0.8 * a[6][0]  # without a jump where the extension starts
    assert a == b  # the same learning rates and losses, bit for bit, across the crash inside the extension
    extended = [e for e in read_metrics(straight.job_dir(0) / "metrics.jsonl") if e["event"] == "extended"]
    assert [(e["step"], e["from_steps"], e["to_steps"]) for e in extended] == [(6, 10, 14)]
    marker = json.loads((straight.job_dir(0) / "global_step14" / "dbscale.json").read_text())
    assert marker["schedule"]["steps"] == 10 and marker["schedule"]["extensions"][0][:2] == [6, 14]
