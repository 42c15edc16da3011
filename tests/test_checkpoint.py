"""Checkpoint verification without DeepSpeed: markers, hashes, fallback to the newest intact tag."""

import pytest
import torch
from helpers import RUN, fake_tag

from dbscale.errors import CheckpointError
from dbscale.train import checkpoint as ckpt


def test_rank_files_split_by_owner(tmp_path):
    tag = fake_tag(tmp_path, 5)
    assert [f.name for f in ckpt.rank_files(tag, 0)] == ["mp_rank_00_model_states.pt"]
    assert [f.name for f in ckpt.rank_files(tag, 1)] == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_newest_intact_checkpoint_is_found(tmp_path):
    fake_tag(tmp_path, 5)
    fake_tag(tmp_path, 10)
    assert ckpt.find_resumable(tmp_path, RUN, 0).step == 10
    assert ckpt.find_resumable(tmp_path / "empty", RUN, 0) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-marker"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path, damage):
    fake_tag(tmp_path, 5)
    tag = fake_tag(tmp_path, 10, marker=damage != "no-marker")
    f = tag / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-20])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    with pytest.warns(UserWarning, match="global_step10"):
        info = ckpt.find_resumable(tmp_path, RUN, 0)
    assert info.step == 5


def test_only_damaged_checkpoints_is_an_error_naming_the_file(tmp_path):
    tag = fake_tag(tmp_path, 5)
    f = tag / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt.*truncated.*delete the damaged"):
        ckpt.find_resumable(tmp_path, RUN, 0)


def test_checkpoint_of_another_run_or_block_is_refused(tmp_path):
    fake_tag(tmp_path, 5, run_id="run-b")
    with pytest.raises(CheckpointError, match="belongs to run run-b"):
        ckpt.find_resumable(tmp_path, RUN, 0)
    with pytest.raises(CheckpointError, match="is of block 0, expected 1"):
        ckpt.find_resumable(tmp_path, "run-b", 1)


def test_prune_keeps_the_newest(tmp_path):
    for step in (3, 6, 9, 12):
        fake_tag(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert ckpt.list_tags(tmp_path) == ["global_step12", "global_step9"]


class Payload:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker_path):
        self.marker_path = str(marker_path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker_path}",))


def test_malicious_pickle_with_a_forged_marker_is_refused_unloaded(tmp_path):
    """An attacker who can write the run directory can also forge the marker's hashes; the pickle screen
    still refuses the file, and the payload never runs."""
    fake_tag(tmp_path, 5)
    tag = fake_tag(tmp_path, 10)
    ran = tmp_path / "payload-ran"
    torch.save({"module": Payload(ran)}, tag / "mp_rank_00_model_states.pt")
    files = ckpt.hash_files(ckpt.rank_files(tag, 0) + ckpt.rank_files(tag, 1))
    ckpt.write_marker(tmp_path, tag.name, {"run_id": RUN, "block": 0, "step": 10}, files)
    with pytest.raises(CheckpointError, match=r"refused: the file would call \['posix.system'\]"):
        ckpt.find_resumable(tmp_path, RUN, 0)
    assert not ran.exists()


def test_real_deepspeed_globals_are_allowed(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": torch.zeros(2)}, path)
    ckpt.screen_pickle(path)  # does not raise
