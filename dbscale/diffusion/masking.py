"""Masked diffusion (MD4 / MDLM, docs/METHOD.md 7b): schedules, the t-partition, ELBO weights, sampler steps.

A token is still unmasked at time t in [0, 1] with probability alpha(t); alpha decreases from alpha(0) = 1.
The continuous-time negative ELBO of a sequence x_0 of T characters (MD4 Eq. 4, MDLM Eq. 10) is

    NELBO = int_0^1 w(t) E_{x_t ~ q(.|x_0)} [ sum_{i masked in x_t} CE(f(x_t, t)_i, x_0i) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t)),

and the partition gives block b the t-slice where alpha falls by 1/B of its total range, so the NELBO is the
sum over blocks of the same integral over each block's slice. Block 0 owns the HIGHEST t (most masked, the
first sampler steps), block B-1 the lowest, as the noise slices of the Gaussian families.

Schedules (alpha_min = alpha(1)):
  'linear'     alpha = 1 - t                                (MD4; w = 1/t; alpha_min = 0)
  'loglinear'  alpha = 1 - (1 - eps) t                      (MDLM's log-linear noise sigma(t) = -log(1-(1-eps)t);
                                                             w = 1/t; alpha_min = eps)
  'cosine'     alpha = 1 - cos(pi/2 (1 - t))                 (MD4's cosine; w = pi/2 tan(pi/2 (1-t)); alpha_min = 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "loglinear", "cosine")


@dataclass(frozen=True)
class MaskSchedule:
    kind: str = "linear"
    eps: float = 1e-3  # 'loglinear' only

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown mask schedule '{self.kind}' (expected one of {SCHEDULES})")

    @property
    def alpha_min(self) -> float:
        return self.eps if self.kind == "loglinear" else 0.0

    def alpha(self, t):
        """Probability that a token is still unmasked at time t (float or tensor)."""
        if self.kind == "linear":
            return 1 - t
        if self.kind == "loglinear":
            return 1 - (1 - self.eps) * t
        return 1 - _cos(math.pi / 2 * (1 - t))

    def t_of_alpha(self, a: float) -> float:
        """The inverse of alpha on [alpha_min, 1]."""
        a = min(max(a, self.alpha_min), 1.0)
        if self.kind == "linear":
            return 1 - a
        if self.kind == "loglinear":
            return (1 - a) / (1 - self.eps)
        return 1 - 2 / math.pi * math.acos(min(1.0, 1 - a))

    def weight(self, t):
        """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (float or tensor, t > 0)."""
        if self.kind in ("linear", "loglinear"):
            return 1 / t
        x = math.pi / 2 * (1 - t)
        return math.pi / 2 * (_sin(x) / _cos(x))

    def u_of_t(self, t: float) -> float:
        """The partition's coordinate: the fraction of alpha's total decrease reached at t (0 at t=0, 1 at t=1)."""
        return (1 - self.alpha(t)) / (1 - self.alpha_min)

    def t_of_u(self, u: float) -> float:
        if self.kind in ("linear", "loglinear"):
            return u  # alpha is linear in t for both, so u = t exactly
        return self.t_of_alpha(1 - u * (1 - self.alpha_min))


def _cos(x):
    return torch.cos(x) if isinstance(x, torch.Tensor) else math.cos(x)


def _sin(x):
    return torch.sin(x) if isinstance(x, torch.Tensor) else math.sin(x)


def schedule_from_config(d) -> MaskSchedule:
    return MaskSchedule(d.mask_schedule, d.mask_eps)


@dataclass(frozen=True)
class TPartition:
    """The t-slices of B blocks, (lo, hi) in t, indexed by block (0 = highest t, most masked)."""

    boundaries: tuple[float, ...]  # ascending t, B+1 values from 0 to 1
    intervals: tuple[tuple[float, float], ...]  # each block's own slice: the NELBO is summed over these
    train_intervals: tuple[tuple[float, float], ...]  # widened by gamma in alpha space: where t is drawn

    @classmethod
    def build(
        cls, num_blocks: int, schedule: MaskSchedule, gamma: float, t_boundaries: list[float] | None = None
    ) -> TPartition:
        """Equal decrements of alpha: t_b = alpha^-1(1 - b (1 - alpha_min) / B); B=3 linear gives
        [0, 1/3, 2/3, 1]; or the given `t_boundaries`. The overlap widens each block's alpha-slice by gamma
        times its width on both sides (clamped to [alpha_min, 1]), the alpha-space analogue of the Gaussian
        families' log-space widening."""
        B = num_blocks
        if B < 1:
            raise ValueError("num_blocks must be >= 1")
        if t_boundaries is not None:
            bounds = [float(t) for t in t_boundaries]
        else:
            bounds = [0.0, *(schedule.t_of_u(b / B) for b in range(1, B)), 1.0]
        intervals, train = [], []
        for b in range(B):
            lo, hi = bounds[B - 1 - b], bounds[B - b]
            lo_u, hi_u = schedule.u_of_t(lo), schedule.u_of_t(hi)
            if not lo < hi:
                raise ValueError(f"block {b} gets an empty t-interval [{lo}, {hi}]")
            intervals.append((lo, hi))
            width = hi_u - lo_u
            w_lo, w_hi = max(lo_u - gamma * width, 0.0), min(hi_u + gamma * width, 1.0)
            train.append((0.0 if w_lo == 0 else schedule.t_of_u(w_lo), 1.0 if w_hi == 1 else schedule.t_of_u(w_hi)))
        return cls(tuple(bounds), tuple(intervals), tuple(train))

    @classmethod
    def from_config(cls, d) -> TPartition:
        return cls.build(d.num_blocks, schedule_from_config(d), d.gamma, d.t_boundaries)

    @classmethod
    def from_record(cls, record: dict) -> TPartition:
        """From the record a run's manifest stores (the one source every job and merged model reads)."""
        return cls(
            tuple(record["t_boundaries"]),
            tuple(tuple(iv) for iv in record["block_intervals"]),
            tuple(tuple(iv) for iv in record["train_intervals"]),
        )


def stratified_times(n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n times in [lo, hi], one per stratum: t_i = lo + (hi - lo) (u + i) / n with one shared u ~ U(0, 1)
    (the low-discrepancy sampler of MDLM / VDM), in shuffled order. Lowers the variance of the ELBO estimate."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    strata = (u + torch.arange(n, dtype=torch.float64)) / n
    order = torch.randperm(n, generator=generator)
    return (lo + (hi - lo) * strata[order]).float()


def sample_steps(
    num_steps: int, num_blocks: int, schedule: MaskSchedule, t_boundaries: list[float] | None = None
) -> tuple[list[float], list[int]]:
    """The ancestral sampler's N+1 times, from 1 down to 0, at equal steps of the partition's coordinate v
    (equal decrements of alpha; with explicit `t_boundaries`, v = b/B at boundary b and linear in t between
    them), and the block serving each of the N steps, BY INDEX: step k goes from v = 1 - k/N to 1 - (k+1)/N
    and is served by the block owning its start, block floor(k B / N). With N >= B no block is skipped
    (floor(kB/N) rises by at most 1 per step); with N = B, step k is block k."""
    if num_steps < num_blocks:
        raise ValueError(
            f"{num_steps} sampling steps cannot visit all {num_blocks} blocks; use at least {num_blocks} steps"
        )

    def t_at(v: float) -> float:
        if t_boundaries is None:
            return schedule.t_of_u(v)
        x = v * num_blocks
        b = min(int(x), num_blocks - 1)
        return t_boundaries[b] + (x - b) * (t_boundaries[b + 1] - t_boundaries[b])

    times = [1.0, *(t_at(1 - k / num_steps) for k in range(1, num_steps)), 0.0]
    return times, [(k * num_blocks) // num_steps for k in range(num_steps)]
