"""Noise calibration: proposals against closed forms, the calibrated partition, applying it to a run."""

import json
import math
import sys

import numpy as np
import pytest
import yaml
from helpers import run_cli

from dbscale.create_run import prepare_run
from dbscale.diffusion.calibrate import (
    ce_level_boundaries,
    lognormal_fit,
    loss_integral_boundaries,
    monotone,
)
from dbscale.diffusion.noise import lognormal_cdf, lognormal_icdf
from dbscale.diffusion.partition import Partition, sigma_boundaries, step_sigmas, steps_to_blocks, warp
from dbscale.errors import ConfigError, RunError
from dbscale.families import config_from_dict
from dbscale.files import sha256_file
from dbscale.run import CONFIG, open_run, partition_record, set_partition
from dbscale.train.calibration import measure_loss_curve  # noqa: E402

EDM = dict(P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0)
GRID = np.exp(np.linspace(math.log(0.002), math.log(80.0), 4001)).tolist()
GRID[0], GRID[-1] = 0.002, 80.0


def sigmoid_curve(m: float, s: float, H: float = 6.0) -> list[float]:
    """A CE curve that is exactly H * Phi((ln sigma - m) / s): its level crossings are known in closed form."""
    return [H * lognormal_cdf(x, m, s) for x in GRID]


def test_ce_levels_cross_the_curve_at_equal_fractions():
    m, s, B = math.log(0.3), 0.5, 4
    bounds = ce_level_boundaries(GRID, sigmoid_curve(m, s), B)
    lo, hi = 6.0 * lognormal_cdf(GRID[0], m, s), 6.0 * lognormal_cdf(GRID[-1], m, s)
    expected = [lognormal_icdf((lo + k / B * (hi - lo)) / 6.0, m, s) for k in range(1, B)]
    assert bounds[0] == 0.002 and bounds[-1] == 80.0
    assert bounds[1:-1] == pytest.approx(expected, rel=2e-3)


def test_loss_integral_of_a_flat_curve_is_the_equiprobable_partition():
    """With CE constant, CE x log-normal density is the log-normal itself: its quantiles are the paper's."""
    for B in (2, 3, 4, 6):
        bounds = loss_integral_boundaries(GRID, [2.0] * len(GRID), B, EDM["P_mean"], EDM["P_std"])
        assert bounds == pytest.approx(sigma_boundaries(B, "equiprobable", **EDM), rel=2e-3)


def test_lognormal_fit_recovers_the_transition():
    pm, ps = lognormal_fit(GRID, sigmoid_curve(math.log(0.25), 0.6))
    assert pm == pytest.approx(math.log(0.25), abs=5e-3) and ps == pytest.approx(0.6, rel=1e-2)


def test_monotone_envelope_ignores_noise_dips():
    assert monotone([0.0, 1.0, 0.8, 2.0, 1.9]).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]


def test_calibrated_steps_stay_inside_their_blocks():
    bounds = [0.002, 0.25, 0.34, 0.52, 80.0]
    part = Partition.build(4, "calibrated", 0.0, **EDM, boundaries=bounds)
    assert part.intervals == ((0.52, 80.0), (0.34, 0.52), (0.25, 0.34), (0.002, 0.25))
    assert warp(0.0, bounds) == pytest.approx(0.002) and warp(0.5, bounds) == pytest.approx(0.34)
    for n in range(4, 33):
        sig = step_sigmas(n, "calibrated", **EDM, boundaries=bounds)
        assert sig[0] == 80.0 and sig[-1] == 0.002 and all(a > b for a, b in zip(sig, sig[1:]))
        for s, b in zip(sig, steps_to_blocks(n, 4), strict=True):
            lo, hi = part.intervals[b]
            assert lo * (1 - 1e-9) <= s <= hi * (1 + 1e-9), (n, s, b)


def test_calibrated_with_paper_boundaries_matches_equiprobable_ends():
    bounds = sigma_boundaries(4, "equiprobable", **EDM)
    sig = step_sigmas(4, "calibrated", **EDM, boundaries=bounds)
    # u = 2/3 and 1/3 are not boundaries, but the points fall in blocks 1 and 2 like the paper's.
    assert bounds[2] < sig[1] < bounds[3] and bounds[1] < sig[2] < bounds[2]


@pytest.mark.parametrize(
    "diffusion, message",
    [
        (
            {"partition": "calibrated", "boundaries": [0.002, 80.0]},
            "diffusion.boundaries: partition 'calibrated' needs",
        ),
        ({"calibration_steps": 0}, "diffusion.calibration_steps"),
        ({"partition": "calibrated", "boundaries": [0.002, 0.5, 0.5, 80.0]}, "strictly ascending"),
        ({"partition": "calibrated", "boundaries": [0.01, 0.3, 80.0]}, "must start at sigma_min"),
        ({"boundaries": [0.002, 0.3, 80.0]}, "only read by partition 'calibrated'"),
    ],
)
def test_bad_calibrated_configs_name_the_field(diffusion, message):
    B = 3 if len(diffusion.get("boundaries", [])) == 4 else 2
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"diffusion": {"num_blocks": B, **diffusion}, "model": {"n_layers": 6}})


@pytest.fixture
def run(tiny_cfg, tmp_path):
    return prepare_run(tiny_cfg(), tmp_path / "run", log=lambda *a: None)


def test_set_partition_rewrites_config_and_manifest(run, tiny_cfg):
    changed = set_partition(run, {"partition": "calibrated", "boundaries": [0.002, 0.4, 80.0]}, {"method": "x"})
    assert changed.manifest["partition"]["sigma_boundaries"] == [0.002, 0.4, 80.0]
    assert changed.manifest["partition"]["kind"] == "calibrated"
    assert yaml.safe_load((run.root / CONFIG).read_text())["diffusion"]["boundaries"] == [0.002, 0.4, 80.0]
    open_run(run.root)  # hashes verify
    assert prepare_run(tiny_cfg(), run.root, log=lambda *a: None).manifest["run_id"] == run.run_id  # no-op
    again = set_partition(changed, {"partition": "equiprobable", "P_mean": -1.0}, {"method": "y"})
    assert again.config.diffusion.boundaries is None and again.config.diffusion.P_mean == -1.0


def test_set_partition_refuses_once_a_block_started(run):
    (run.job_dir(1)).mkdir(parents=True)
    (run.job_dir(1) / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    before = (run.root / CONFIG).read_bytes()
    with pytest.raises(RunError, match=r"block\(s\) \[1\] have already started"):
        set_partition(run, {"partition": "uniform"}, {})
    assert (run.root / CONFIG).read_bytes() == before


def test_the_measured_curve_rises_with_noise(run):
    curve = measure_loss_curve(run, steps=150, layers=1, grid_points=7, val_windows=8, log=lambda *a: None)
    assert curve["sigma"][0] == 0.002 and curve["sigma"][-1] == 80.0 and len(curve["ce"]) == 7
    # After a few steps a denoiser already reads a nearly clean target; at sigma_max it can only guess.
    assert curve["ce"][0] < 0.5 * curve["ce"][-1]


def test_calibrate_cli_applies_the_proposal_to_the_run(run):
    out = run_cli([sys.executable, "tools/calibrate_noise.py", "--run", str(run.root), "--steps", "30", "--grid", "9"])
    assert "applied 'ce_levels'" in out.stdout, out.stdout + out.stderr
    calibrated = open_run(run.root)
    assert calibrated.config.diffusion.partition == "calibrated"
    bounds = calibrated.manifest["partition"]["sigma_boundaries"]
    assert bounds[0] == 0.002 and bounds[-1] == 80.0 and 0.002 < bounds[1] < 80.0
    # Block jobs read their slices from the manifest: they must be the calibrated config's.
    expected = Partition.from_config(calibrated.config.diffusion).train_intervals
    assert [tuple(iv) for iv in calibrated.manifest["partition"]["train_intervals"]] == list(expected)
    dry = run_cli([sys.executable, "tools/prepare.py", "--config", str(run.root / CONFIG), "--dry-run"])
    assert '"kind": "calibrated"' in dry.stdout


def test_prepare_calibrates_when_boundaries_are_null_and_blocks_wait_for_it(tiny_cfg, tmp_path, process_group):
    from dbscale.train.trainer import Trainer

    cfg = tiny_cfg(diffusion={"partition": "calibrated", "calibration": "loss_integral", "calibration_steps": 20})
    assert partition_record(cfg)["pending"] is True  # what the dry run shows before the measurement
    logs = []
    r = prepare_run(cfg, tmp_path / "auto", log=logs.append)
    part = r.manifest["partition"]
    assert "pending" not in part and r.manifest["calibration"]["method"] == "loss_integral"
    assert r.config.diffusion.boundaries == part["sigma_boundaries"] and len(part["sigma_boundaries"]) == 3
    assert any("partition 'loss_integral'" in m for m in logs)
    assert prepare_run(cfg, r.root, log=lambda *a: None).run_id == r.run_id  # preparing again: a no-op

    # A run whose calibration did not finish: block jobs refuse; preparing again finishes it.
    pending = prepare_run(cfg, tmp_path / "pending", log=lambda *a: None)
    manifest = dict(pending.manifest, partition=partition_record(cfg))
    manifest.pop("calibration")
    (pending.root / "manifest.json").write_text(json.dumps(manifest))
    (pending.root / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    manifest["config_sha256"] = sha256_file(pending.root / CONFIG)
    (pending.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="still to be calibrated"):
        Trainer(open_run(pending.root), 0, 0, 1)
    finished = prepare_run(cfg, pending.root, log=lambda *a: None)
    assert "pending" not in finished.manifest["partition"]


def test_calibration_builds_its_denoiser_with_the_memory_switches(tiny_cfg, tmp_path):
    # A recipe with the target-table head and context must calibrate too (the denoiser then needs the table).
    cfg = tiny_cfg(model={"head": "target", "context_embedding": "target"})
    r = prepare_run(cfg, tmp_path / "switches", log=lambda *a: None)
    curve = measure_loss_curve(r, steps=3, layers=1, grid_points=3, val_windows=4, log=lambda *a: None)
    assert len(curve["ce"]) == 3 and all(math.isfinite(c) for c in curve["ce"])
