"""Shared fixtures: tiny configs on real text (the bundled speeches), isolated caches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

ROOT = Path(__file__).resolve().parents[1]

# Property tests run derandomized (the same examples every run: CI must not flake); hunt for new failures
# with HYPOTHESIS_PROFILE=explore.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", max_examples=3000, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def speeches() -> list[Path]:
    from dbscale.data.sources import bundled_speeches_dir

    return sorted(bundled_speeches_dir().glob("*.txt"))


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


@pytest.fixture
def tiny_cfg(speeches):
    from dbscale.families import config_from_dict

    def make(**sections):
        return config_from_dict(tiny_config_dict([str(p) for p in speeches[:12]], **sections))

    return make


@pytest.fixture
def small_run(tiny_cfg, tmp_path):
    """A prepared tiny run (6 steps, a checkpoint every 2) with train.* overrides."""
    from dbscale.create_run import prepare_run

    def make(**train):
        cfg = tiny_cfg(train={"steps": 6, "save_every": 2, "val_every": 0, **train})
        return prepare_run(cfg, tmp_path / "run", log=lambda *a: None)

    return make


def events(run, block, kind) -> list[dict]:
    """The events of one kind in a job's metrics.jsonl."""
    from dbscale.train.metrics import read_metrics

    return [e for e in read_metrics(run.job_dir(block) / "metrics.jsonl") if e["event"] == kind]


@pytest.fixture(scope="session")
def process_group():
    """One in-process gloo group (no TCP port, DeepSpeed on the CPU accelerator) so Trainer can run inside pytest."""
    import sys

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
    yield


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
