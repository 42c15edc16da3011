"""The noise partition and step schedule against docs/METHOD.md's check values and their defining identities."""

import math

import pytest

from dbscale.diffusion.noise import lognormal_cdf
from dbscale.diffusion.partition import Partition, sigma_boundaries, step_sigmas, steps_to_blocks, widen

EDM = dict(P_mean=-1.2, P_std=1.2, sigma_min=0.002, sigma_max=80.0)

GOLDEN = {  # docs/METHOD.md section 3, inner boundaries, ascending
    2: [0.3012],
    3: [0.1796, 0.5050],
    4: [0.1341, 0.3012, 0.6766],
    6: [0.0943, 0.1796, 0.3012, 0.5050, 0.9617],
}


@pytest.mark.parametrize("B", sorted(GOLDEN))
def test_equiprobable_boundaries_match_paper(B):
    bounds = sigma_boundaries(B, "equiprobable", **EDM)
    assert bounds[0] == 0.002 and bounds[-1] == 80.0
    assert [round(b, 4) for b in bounds[1:-1]] == GOLDEN[B]


@pytest.mark.parametrize("B", [2, 3, 4, 5, 6, 8])
def test_equiprobable_blocks_hold_equal_mass(B):
    bounds = sigma_boundaries(B, "equiprobable", **EDM)
    cdf = [lognormal_cdf(s, EDM["P_mean"], EDM["P_std"]) for s in bounds]
    masses = [hi - lo for lo, hi in zip(cdf, cdf[1:])]
    assert max(masses) - min(masses) < 1e-12


def test_uniform_partition_is_equal_in_log_sigma():
    bounds = sigma_boundaries(4, "uniform", **EDM)
    widths = [math.log(hi / lo) for lo, hi in zip(bounds, bounds[1:])]
    assert max(widths) - min(widths) < 1e-12


def test_block_zero_is_the_highest_noise():
    p = Partition.build(4, "equiprobable", 0.0, **EDM)
    assert p.intervals[0][1] == 80.0 and p.intervals[-1][0] == 0.002
    assert all(p.intervals[b][0] == p.intervals[b + 1][1] for b in range(3))  # contiguous, descending
    assert p.train_intervals == p.intervals  # gamma = 0: no overlap


def test_overlap_widens_in_log_space_and_clamps():
    lo, hi = 0.1341, 0.3012
    wlo, whi = widen(lo, hi, 0.1, 0.002, 80.0)
    a = (hi / lo) ** 0.1
    assert wlo == pytest.approx(lo / a) and whi == pytest.approx(hi * a)
    assert math.log(whi / wlo) == pytest.approx(1.2 * math.log(hi / lo))
    assert widen(0.002, 0.1341, 0.1, 0.002, 80.0)[0] == 0.002  # clamped at sigma_min
    assert widen(0.6766, 80.0, 0.1, 0.002, 80.0)[1] == 80.0


def test_step_sigmas_for_four_steps():
    sig = step_sigmas(4, "equiprobable", **EDM)
    assert [round(s, 4) for s in sig] == [80.0, 0.5050, 0.1796, 0.002]
    assert all(a > b for a, b in zip(sig, sig[1:]))


def test_steps_map_to_blocks_by_index_and_visit_every_block():
    assert steps_to_blocks(4, 3) == [0, 0, 1, 2]  # the boundary lookup would give [0, 0, 2, 2]
    assert steps_to_blocks(4, 4) == [0, 1, 2, 3]
    for B in range(1, 7):
        for N in range(B, 25):
            blocks = steps_to_blocks(N, B)
            assert blocks == sorted(blocks) and set(blocks) == set(range(B))


def test_step_sigmas_can_sit_exactly_on_boundaries():
    """Why the mapping is by index: for B=3 and 4 steps, steps 1 and 2 fall exactly on the block
    boundaries, so looking sigma up in the intervals is decided by float rounding."""
    bounds = sigma_boundaries(3, "equiprobable", **EDM)
    sig = step_sigmas(4, "equiprobable", **EDM)
    assert sig[1] == pytest.approx(bounds[2], rel=1e-12) and sig[2] == pytest.approx(bounds[1], rel=1e-12)


def test_too_few_steps_is_refused():
    with pytest.raises(ValueError):
        steps_to_blocks(2, 3)
    with pytest.raises(ValueError):
        step_sigmas(1, "equiprobable", **EDM)
