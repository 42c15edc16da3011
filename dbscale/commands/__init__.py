"""The `dbscale` command's verbs. Each module has a docstring (its help), `add_arguments(parser)` and
`execute(args, parser) -> exit status`; `dbscale/cli.py` groups them, and the tools/ and launchers/ scripts
run one of them alone (`script`)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

# verb -> (module, one-line summary), in the order of a run's life
VERBS = {
    "prepare": ("prepare", "create a run: tokenizer, shards, target table, noise partition"),
    "train": ("train", "train one block (or the baseline) through the DeepSpeed launcher"),
    "launch": ("launch", "train every block (and the baseline): here, or over a hostfile"),
    "status": ("status", "the state of every job of a run"),
    "merge": ("merge", "consolidate the trained blocks (or the baseline) into one model"),
    "generate": ("generate", "sample text from a merged model; held-out accuracies"),
    "evaluate": ("evaluate", "MAUVE, generative perplexity and held-out figures of merged models"),
    "report": ("report", "figures and an HTML page of a run"),
    "calibrate": ("calibrate", "measure CE(sigma) and place the noise partition by it"),
    "export": ("export", "write a merged baseline as a Hugging Face Llama folder"),
    "import": ("import_hf", "start a run's jobs from a Hugging Face Llama"),
    "config": ("config", "every config field with its default and meaning"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default (when it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def module(verb: str):
    return importlib.import_module(f"dbscale.commands.{VERBS[verb][0]}")


def parser_for(verb: str, prog: str | None = None) -> argparse.ArgumentParser:
    mod = module(verb)
    p = argparse.ArgumentParser(prog=prog, description=mod.__doc__, formatter_class=HelpFormatter)
    mod.add_arguments(p)
    return p


def script(verb: str, argv: list[str] | None = None) -> int:
    """Run one verb as a standalone script (tools/*.py): parse, execute, one clear line on a DbscaleError."""
    from dbscale.errors import cli_main

    p = parser_for(verb)
    return cli_main(lambda: module(verb).execute(p.parse_args(argv), p))


def invocation(argv: list[str] | None = None) -> str:
    """This process's command line as one would type it again (`dbscale evaluate ...`, `python tools/x.py ...`),
    for the reports a verb writes: a result says how to produce it again."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0])
    if program.suffix == ".py":
        if program.is_absolute() and program.is_relative_to(Path.cwd()):
            program = program.relative_to(Path.cwd())
        head = ["python", program.as_posix()]
    else:
        head = [program.name]
    return shlex.join([*head, *argv[1:]])
