"""Every kind of configuration that validation lets through runs to samples: for each family, tokenizer type,
partition, AR block design and sampler setting, a tiny run goes prepare -> train every job -> merge -> generate
-> evaluate (bits per character for the masked family) through the `dbscale` command, in process. Anything but
a clean exit or a dbscale error (one line, exit status 2) fails the test; so does a dbscale error here, since
every combination below is one that `prepare` accepted.

The combinations cover each accepted value of each switch at least once (not their full product, which would
take hours); the refusals of combinations that cannot work are tested next to each switch (test_config.py,
test_stream_block.py)."""

import pytest
import yaml

from dbscale.cli import main

MATRIX = {
    "llama-default": {},
    "llama-paper-block-uniform": {
        "model": {"block": "paper"},
        "diffusion": {"partition": "uniform", "loss_weighting": "edm", "prior_loss": 0.0},
    },
    "llama-ancestral-sample-unigram": {
        "diffusion": {"sample_estimate": "sample", "sample_step": "ancestral", "prior_loss": 0.0},
        "data": {"tokenizer_type": "unigram"},
    },
    "llama-stream-calibrated-argmax": {
        "model": {"block": "stream"},
        "diffusion": {"partition": "calibrated", "calibration_steps": 2, "sample_estimate": "argmax"},
    },
    "llama-stream-sigma-free-position-topk-subset": {
        "model": {"block": "stream", "time_conditioning": False},
        "diffusion": {"sigma_draw": "position", "sample_top_k": 4, "noisy_fraction": 0.5, "sample_steps": 5},
    },
    "llama-char-stream": {
        "model": {"block": "stream", "time_conditioning": False},
        "data": {"tokenizer_type": "char", "vocab_size": 27, "normalize": "text8"},
    },
    "llama-target-table-switches-b1": {
        "model": {"head": "target", "context_embedding": "target", "target_dim": 16},
        "diffusion": {"num_blocks": 1},
        "train": {"ce_chunk": 16, "activation_checkpointing": True, "zero_stage": 3},
    },
    "masked-char-loglinear": {
        "model": {"family": "masked"},
        "diffusion": {"mask_schedule": "loglinear"},
        "data": {"tokenizer_type": "char", "vocab_size": 27, "normalize": "text8"},
    },
    "masked-bpe-no-time-cosine": {
        "model": {"family": "masked", "time_conditioning": False},
        "diffusion": {"mask_schedule": "cosine", "num_blocks": 1},
    },
    "huginn": {
        "model": {"family": "huginn", "n_layers": 4},
        "model_extra": {
            "huginn": {"prelude_layers": 1, "core_layers": 2, "coda_layers": 1, "mean_recurrence": 2, "bptt_steps": 1}
        },
        "diffusion": {"num_blocks": 1, "sample_steps": 3, "gamma": 0.0},
    },
    "huginn-stream-sigma-free-two-cores": {
        "model": {"family": "huginn", "n_layers": 4, "block": "stream", "time_conditioning": False},
        "model_extra": {
            "huginn": {"prelude_layers": 1, "core_layers": 2, "coda_layers": 1, "mean_recurrence": 2, "bptt_steps": 1}
        },
        "diffusion": {"num_blocks": 2, "sample_steps": 4, "sigma_draw": "position", "noisy_fraction": 0.5},
    },
}


def cli(*args: str) -> None:
    """Run a dbscale verb in this process; it must end with status 0 (a dbscale error exits 2 and fails here)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    assert done.value.code == 0, f"dbscale {' '.join(args)} exited {done.value.code}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_every_accepted_configuration_runs_to_samples(process_group, speeches, tmp_path, name):
    from helpers import tiny_config_dict

    from dbscale.run import open_run
    from dbscale.train.trainer import Trainer

    sections = {k: dict(v) for k, v in MATRIX[name].items()}
    sections["model"] = {**sections.get("model", {}), **sections.pop("model_extra", {})}
    sections["train"] = {"steps": 2, "save_every": 100, "val_every": 0, "log_every": 1, **sections.get("train", {})}
    cfg = tiny_config_dict([str(p) for p in speeches[:8]], **sections)  # ours over the tiny run's values
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = str(tmp_path / "run")

    cli("prepare", "--config", str(config), "--run", r)
    run = open_run(r)
    for job in [*range(run.num_blocks), None]:
        trainer = Trainer(run, job, 0, 1)
        trainer.train()
        trainer.close()
    cli("merge", "--run", r)
    cli("merge", "--run", r, "--e2e")
    masked = run.config.model.family == "masked"
    for model in (f"{r}/merged", f"{r}/e2e/merged"):
        if masked:
            cli("generate", "--model", model, "--num-samples", "2", "--steps", "4", "--bpc", r, "--t-samples", "1")
        else:
            cli("generate", "--model", model, "--prompt", "The Congress", "--max-new-tokens", "6")
    if not masked:
        cli(
            "evaluate",
            "--model",
            f"{r}/merged",
            "--compare",
            f"{r}/e2e/merged",
            "--data",
            r,
            "--num-prompts",
            "5",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "6",
        )
