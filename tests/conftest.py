"""Shared fixtures: tiny configs on real text (the bundled speeches), isolated caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

from helpers import tiny_config_dict  # noqa: E402  (after the offline switches: it imports dbscale)

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


@pytest.fixture(scope="session")
def process_group():
    """One in-process gloo group (no TCP port, DeepSpeed on the CPU accelerator) so Trainer can run inside pytest."""

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
    yield
