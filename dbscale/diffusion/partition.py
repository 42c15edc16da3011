"""Noise partitions: which slice of [sigma_min, sigma_max] each block owns, and the sampler's steps.

Block 0 owns the HIGHEST noise and holds the first layers (next to the input); block B-1 the lowest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dbscale.diffusion.noise import lognormal_cdf, lognormal_icdf


def sigma_at(
    u: float,
    kind: str,
    P_mean: float,
    P_std: float,
    sigma_min: float,
    sigma_max: float,
    boundaries: list[float] | None = None,
) -> float:
    """The partition's schedule: u in [0, 1] -> sigma, u = 0 at sigma_min and 1 at sigma_max; block b owns
    the u-slice [(B-1-b)/B, (B-b)/B]. Both the block boundaries and the sampler's steps are read from it.

    'equiprobable' (paper, section 3.3): sigma = exp(P_mean + P_std * Phi^-1(q_min + u (q_max - q_min))),
        so every block holds the same mass of the truncated log-normal.
    'uniform' (the paper's ablation): log-uniform in sigma.
    'calibrated': piecewise log-linear through the measured `boundaries` (tools/calibrate_noise.py).
    """
    if kind == "equiprobable":
        q_min = lognormal_cdf(sigma_min, P_mean, P_std)
        q_max = lognormal_cdf(sigma_max, P_mean, P_std)
        return lognormal_icdf(q_min + u * (q_max - q_min), P_mean, P_std)
    if kind == "uniform":
        lo, hi = math.log(sigma_min), math.log(sigma_max)
        return math.exp(lo + u * (hi - lo))
    if kind == "calibrated":
        if not boundaries or len(boundaries) < 2:
            raise ValueError("partition 'calibrated' needs its boundaries")
        return warp(u, boundaries)
    raise ValueError(f"unknown partition '{kind}' (expected 'equiprobable', 'uniform' or 'calibrated')")


def sigma_boundaries(
    num_blocks: int,
    kind: str,
    P_mean: float,
    P_std: float,
    sigma_min: float,
    sigma_max: float,
    boundaries: list[float] | None = None,
) -> list[float]:
    """B+1 ascending boundaries from sigma_min to sigma_max: `sigma_at(b/B)`, with exact ends (and, for
    'calibrated', exactly the given boundaries)."""
    B = num_blocks
    if kind == "calibrated":
        if boundaries is None or len(boundaries) != B + 1:
            raise ValueError(f"partition 'calibrated' needs {B + 1} boundaries, got {boundaries}")
        return [float(b) for b in boundaries]
    inner = [sigma_at(b / B, kind, P_mean, P_std, sigma_min, sigma_max) for b in range(1, B)]
    return [sigma_min, *inner, sigma_max]


def widen(lo: float, hi: float, gamma: float, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Overlap: [lo, hi] -> [lo/a, hi*a] with a = (hi/lo)^gamma, clamped to [sigma_min, sigma_max]."""
    a = (hi / lo) ** gamma
    return max(lo / a, sigma_min), min(hi * a, sigma_max)


@dataclass(frozen=True)
class Partition:
    """The noise slices of B blocks. Intervals are (lo, hi) in sigma, indexed by block (0 = highest noise)."""

    boundaries: tuple[float, ...]  # ascending, B+1 values
    intervals: tuple[tuple[float, float], ...]  # each block's own slice
    train_intervals: tuple[tuple[float, float], ...]  # widened by gamma: where each block draws sigma

    @property
    def num_blocks(self) -> int:
        return len(self.intervals)

    @classmethod
    def build(
        cls,
        num_blocks: int,
        kind: str,
        gamma: float,
        P_mean: float,
        P_std: float,
        sigma_min: float,
        sigma_max: float,
        boundaries: list[float] | None = None,
    ) -> Partition:
        bounds = sigma_boundaries(num_blocks, kind, P_mean, P_std, sigma_min, sigma_max, boundaries)
        B = num_blocks
        intervals = tuple((bounds[B - 1 - b], bounds[B - b]) for b in range(B))
        train = tuple(widen(lo, hi, gamma, sigma_min, sigma_max) for lo, hi in intervals)
        return cls(tuple(bounds), intervals, train)

    @classmethod
    def from_config(cls, d) -> Partition:
        """From a `DiffusionConfig`."""
        return cls.build(d.num_blocks, d.partition, d.gamma, d.P_mean, d.P_std, d.sigma_min, d.sigma_max, d.boundaries)

    @classmethod
    def from_record(cls, record: dict) -> Partition:
        """From the record a run's manifest stores (the one source every job and merged model reads)."""
        if record.get("pending"):
            raise ValueError("the partition is still to be calibrated")
        return cls(
            tuple(record["sigma_boundaries"]),
            tuple(tuple(iv) for iv in record["block_intervals"]),
            tuple(tuple(iv) for iv in record["train_intervals"]),
        )

    def block_interval(self, b: int) -> tuple[float, float]:
        return self.intervals[b]


def warp(u: float, boundaries: list[float]) -> float:
    """The calibrated schedule: u = b/B at boundary b, log-linear in sigma between boundaries."""
    B = len(boundaries) - 1
    x = min(max(u, 0.0), 1.0) * B
    b = min(int(x), B - 1)
    lo, hi = math.log(boundaries[b]), math.log(boundaries[b + 1])
    return math.exp(lo + (x - b) * (hi - lo))


def step_sigmas(
    num_steps: int,
    kind: str,
    P_mean: float,
    P_std: float,
    sigma_min: float,
    sigma_max: float,
    boundaries: list[float] | None = None,
) -> list[float]:
    """Descending sampler sigmas, from sigma_max to sigma_min inclusive (num_steps >= 2 points): equal steps
    of the partition's schedule `sigma_at`, u_k = 1 - k/(N-1). With 4 steps (B=4) the equi-probability points
    are [80, 0.5050, 0.1796, 0.002].
    """
    if num_steps < 2:
        raise ValueError("the sampler needs at least 2 steps (sigma_max and sigma_min)")
    sig = [
        sigma_at(1 - k / (num_steps - 1), kind, P_mean, P_std, sigma_min, sigma_max, boundaries)
        for k in range(num_steps)
    ]
    sig[0], sig[-1] = sigma_max, sigma_min  # exact ends, whatever the float round trip gives
    return sig


def steps_to_blocks(num_steps: int, num_blocks: int) -> list[int]:
    """Which block serves each sampler step, BY INDEX (exact integer arithmetic, no sigma comparison).

    Step k sits at u_k = 1 - k/(N-1) of the partition's quantile scale, where block b owns the u-slice
    [(B-1-b)/B, (B-b)/B]; so step k goes to block ceil(k*B/(N-1)) - 1 (at least 0), a step exactly on a
    boundary to the higher-noise block. For N = B this is step k -> block k; B=3 with 4 steps gives
    [0, 0, 1, 2] (comparing sigma to the boundaries instead can give [0, 0, 2, 2] through float rounding).
    The rule floor(k*B/N) agrees for N = B but sends some steps outside their block's slice for other N
    (B=4, N=6: step 4 at u=0.2 would go to block 2, which owns [0.25, 0.5]).
    """
    if num_steps < num_blocks:
        raise ValueError(
            f"{num_steps} sampler steps cannot visit all {num_blocks} blocks; use at least {num_blocks} steps"
        )
    if num_steps < 2:
        return [0] * num_steps
    n = num_steps - 1
    return [max(0, -((-k * num_blocks) // n) - 1) for k in range(num_steps)]


def default_num_steps(num_blocks: int, sample_steps: int | None) -> int:
    """One Euler step per block (the paper's AR setting), but 4 for B <= 2: with 2 steps the chain goes from
    sigma_max to sigma_min in one step, so none of its starting noise survives and every sample is the same
    greedy-like continuation (measured, B=2 at the 1600-step recipe: distinct 4-grams 0.04 and MAUVE 0.006 with
    2 steps, 0.85 and 0.30 with 4; README, "Does the chain write as well as its baseline?")."""
    if sample_steps is not None:
        return sample_steps
    return num_blocks if num_blocks >= 3 else 4


def config_step_sigmas(d, num_steps: int | None = None) -> list[float]:
    """The sampler's sigmas for a `DiffusionConfig` (num_steps defaults to `default_num_steps`)."""
    n = num_steps if num_steps is not None else default_num_steps(d.num_blocks, d.sample_steps)
    return step_sigmas(n, d.partition, d.P_mean, d.P_std, d.sigma_min, d.sigma_max, d.boundaries)
