"""What the tests share (one module; test modules import from here, never from each other or conftest): tiny
configs and models, command runners, fault-injection environments, fake checkpoints."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from dbscale.config import Config, ModelConfig
from dbscale.families import config_from_dict
from dbscale.models.llama import DiffusionBlocksLM, frozen_target_embedding
from dbscale.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


# --- runs --------------------------------------------------------------------------------------------------
def tiny_config_dict(paths: list[str], **sections) -> dict:
    """A very small run: 2 blocks of 1 layer, d=32, 12 speeches, a 512-token vocabulary."""
    cfg = {
        "name": "test-tiny",
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "ffn_multiple_of": 32, "seq_len": 32},
        "diffusion": {"num_blocks": 2},
        "data": {
            "source": "files",
            "paths": paths,
            "vocab_size": 512,
            "val_fraction": 0.2,
            "tokenizer_train_chars": 300000,
        },
        "train": {
            "steps": 6,
            "micro_batch": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "val_every": 3,
            "val_batches": 2,
            "save_every": 3,
            "zero_stage": 2,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def events(run, block, kind) -> list[dict]:
    """The events of one kind in a job's metrics.jsonl."""
    from dbscale.train.metrics import read_metrics

    return [e for e in read_metrics(run.job_dir(block) / "metrics.jsonl") if e["event"] == kind]


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
HOOKS = ROOT / "tests" / "hooks"


def fault_env(**variables: str) -> dict:
    """Environment for a subprocess job with tests/hooks/sitecustomize.py's fault injection switched on."""
    path = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, **variables}


def run_cli(cmd: list[str], expect: int | None = 0, env: dict | None = None, timeout: int = 300):
    """Run an entry point from the repository root (one thread per process); check its exit status."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if expect is not None and p.returncode != expect:
        raise AssertionError(f"{cmd} exited {p.returncode}, expected {expect}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def deepspeed_block(run_dir, block: int, num_gpus: int = 1) -> list[str]:
    """The deepspeed-launcher command that trains one block of a run, on a free port."""
    from dbscale.train.distributed import free_port

    return [
        DEEPSPEED,
        "--num_gpus",
        str(num_gpus),
        "--master_port",
        str(free_port()),
        "launchers/train_block.py",
        "--run",
        str(run_dir),
        "--block",
        str(block),
    ]


# --- tiny models -------------------------------------------------------------------------------------------
CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_multiple_of=32, seq_len=24)  # a Llama block
V = 61  # its vocabulary


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised gates and heads included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


PROMPTS = [[3, 14, 15], [9, 2, 6, 5, 3], [5, 8, 9], [7], [1, 2, 3, 4, 5], [2, 7, 1], [8, 2, 8, 1, 8]]


def llama_chain(estimate: str, step: str) -> DiffusionBlocksLM:
    cfg = Config(model=CFG)
    cfg.diffusion.num_blocks = 2
    cfg.diffusion.sample_estimate, cfg.diffusion.sample_step = estimate, step
    model = DiffusionBlocksLM(cfg, V, frozen_target_embedding(V, CFG.embed_dim, 0))
    for b, block in enumerate(model.blocks):
        randomize(block, seed=b)
    return model.eval()


HUGINN_V = 64


def huginn_cfg(**model):
    """A small Huginn config; keys of the family's own section (HuginnConfig) go to model.huginn."""
    from dbscale.models.huginn import HuginnConfig

    own_keys = {f.name for f in dataclasses.fields(HuginnConfig)}
    own = {"mean_recurrence": 4, "bptt_steps": 2, **{k: v for k, v in model.items() if k in own_keys}}
    model = {k: v for k, v in model.items() if k not in own_keys}
    base = {"family": "huginn", "n_layers": 8, "d_model": 32, "n_heads": 2, "ffn_multiple_of": 32, "seq_len": 32}
    return config_from_dict(
        {
            "model": {**base, "huginn": own, **model},
            "diffusion": {"num_blocks": 1, "sample_steps": 6},
            "data": {"vocab_size": HUGINN_V},
        }
    )


def normal_init(model, std=0.1):
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model


# --- checkpoints -------------------------------------------------------------------------------------------
RUN = "run-a"


def fake_tag(job_dir, step, run_id=RUN, block=0, marker=True):
    tag = ckpt.tag_for(step)
    (job_dir / tag).mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}}, job_dir / tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"step": step}}, job_dir / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    if marker:
        files = ckpt.hash_files(ckpt.rank_files(job_dir / tag, 0) + ckpt.rank_files(job_dir / tag, 1))
        ckpt.write_marker(job_dir, tag, {"run_id": run_id, "block": block, "step": step}, files)
        ckpt.write_latest(job_dir, tag)
    return job_dir / tag
