"""The README's own-corpus quickstart, run as written (parsed from the README, so it cannot drift) on one
small text file, through the installed `dbscale` command; the generated config table is current."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

DBSCALE = str(Path(sys.executable).parent / "dbscale")
# Appended to the README's commands so the test takes a minute, not the recipe's ten: later options win.
FASTER = {
    "prepare": [
        "--set",
        "train.steps=3",
        "--set",
        "train.val_every=3",
        "--set",
        "train.save_every=3",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "data.vocab_size=512",
    ],
    "evaluate": ["--num-prompts", "5", "--samples-per-prompt", "2", "--new-tokens", "8", "--out", "eval.json"],
    "generate": ["--max-new-tokens", "8"],
}


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- quickstart")
    block = text[text.index("```", start) + 3 :]
    return [line.strip() for line in block[: block.index("```")].strip().splitlines()]


@pytest.mark.slow
def test_the_readme_quickstart_runs_on_one_text_file(speeches, tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the README runs from a checkout; so does this, in tmp
    corpus = tmp_path / "my_corpus.txt"  # one file: prepare must cut it into documents
    corpus.write_text("\n\n".join(p.read_text() for p in speeches[:5]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    commands = quickstart_commands()
    assert commands[0] == ". .venv/bin/activate"  # the rest use the installed `dbscale`
    outputs = []
    for line in commands[1:]:
        for part in line.split("&&"):
            argv = shlex.split(part)
            assert argv[0] == "dbscale", line
            argv = [DBSCALE, *argv[1:], *FASTER.get(argv[1], [])]
            p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, f"{part}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
            assert "Traceback" not in p.stderr
            outputs.append(p.stdout + p.stderr)
    prepared = outputs[0]
    assert "1 file(s) with 1 document(s): cut into" in prepared and "validation tokens" in prepared
    assert (tmp_path / "runs/mine/merged/model.safetensors").is_file()
    assert "It was" in outputs[-2]  # generate printed its prompt and continuation
    assert "MAUVE (MiniLM features)" in outputs[-1] and "end-to-end" in outputs[-1]
    report = json.loads((tmp_path / "eval.json").read_text())  # the report says how it was made
    assert report["command"].startswith("dbscale evaluate --model runs/mine/merged --compare runs/mine/e2e/merged")


def test_the_config_documentation_is_current():
    from dbscale.commands.config import markdown

    assert (ROOT / "docs/config.md").read_text() == markdown() + "\n", (
        "docs/config.md is stale: run `dbscale config --markdown --out docs/config.md`"
    )


def test_every_verb_has_help_with_defaults_and_every_script_still_parses():
    help_text = subprocess.run([DBSCALE, "--help"], capture_output=True, text=True, check=True).stdout
    from dbscale.commands import VERBS

    for verb in VERBS:
        assert f"    {verb}" in help_text
    out = subprocess.run([DBSCALE, "evaluate", "--help"], capture_output=True, text=True, check=True).stdout
    assert "(default: 64)" in out  # --num-prompts
    for script in ("tools/prepare.py", "tools/merge_blocks.py", "tools/generate.py", "launchers/launch_blocks.py"):
        p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0 and "usage:" in p.stdout, script


def test_a_report_records_the_command_line_as_typed(tmp_path, monkeypatch):
    from dbscale.commands import invocation

    assert (
        invocation(["/somewhere/bin/dbscale", "evaluate", "--prompt", "It was"]) == "dbscale evaluate --prompt 'It was'"
    )
    monkeypatch.chdir(tmp_path)
    script = str(tmp_path / "tools/evaluate.py")
    assert invocation([script, "--out", "a b.json"]) == "python tools/evaluate.py --out 'a b.json'"
    assert invocation(["/elsewhere/evaluate.py"]) == "python /elsewhere/evaluate.py"
