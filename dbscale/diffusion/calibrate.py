"""Noise calibration: measure how hard denoising is at each sigma, and place the block boundaries by it.

The paper's equi-probability partition balances probability mass of EDM's log-normal, which was tuned for
images. For unit-norm token targets a noisy target is identified by its nearest neighbour once sigma falls
below about 0.15-0.2, so much of that mass lands where a block only has to copy its input. Calibration
trains one small denoiser over the whole range (log-uniform sigma, plain cross-entropy), records its
validation cross-entropy CE(sigma) on a grid, and proposes partitions from the curve:

- 'ce_levels' (time warping in the spirit of CDCD, Dieleman et al. 2022): boundaries where the monotone
  CE curve crosses CE_lo + k/B (CE_hi - CE_lo), so every block removes the same share of the uncertainty;
- 'loss_integral': boundaries at equal quantiles of the integral of CE(sigma) under the run's log-normal,
  so every block carries the same share of the expected training loss;
- 'lognormal': keep the equi-probability rule but move the log-normal onto the measured transition:
  P_mean = ln sigma at half the CE rise, P_std from its 10%-90% span (the EDM loss weight depends on
  sigma_data only, so it stays consistent).
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("ce_levels", "loss_integral", "lognormal")
Z90 = 1.2815515655446004  # Phi^-1(0.9)


def monotone(ce: list[float]) -> np.ndarray:
    """The non-decreasing envelope of a CE curve measured on ascending sigmas (running maximum)."""
    return np.maximum.accumulate(np.asarray(ce, dtype=np.float64))


def _crossing(log_sigma: np.ndarray, curve: np.ndarray, level: float) -> float:
    """ln sigma where the non-decreasing `curve` first reaches `level` (linear in ln sigma between points)."""
    i = int(np.searchsorted(curve, level, side="left"))
    if i == 0:
        return float(log_sigma[0])
    if i >= len(curve):
        return float(log_sigma[-1])
    c0, c1 = curve[i - 1], curve[i]
    f = 0.0 if c1 == c0 else (level - c0) / (c1 - c0)
    return float(log_sigma[i - 1] + f * (log_sigma[i] - log_sigma[i - 1]))


def ce_level_boundaries(sigmas: list[float], ce: list[float], num_blocks: int) -> list[float]:
    """B+1 ascending boundaries: inner boundary k (ascending) where CE reaches CE_lo + k/B * (CE_hi - CE_lo)."""
    ls, curve = np.log(sigmas), monotone(ce)
    lo, hi = curve[0], curve[-1]
    inner = [math.exp(_crossing(ls, curve, lo + k / num_blocks * (hi - lo))) for k in range(1, num_blocks)]
    return [sigmas[0], *inner, sigmas[-1]]


def loss_integral_boundaries(
    sigmas: list[float], ce: list[float], num_blocks: int, P_mean: float, P_std: float
) -> list[float]:
    """B+1 ascending boundaries at equal quantiles of the integral of CE(sigma) p(sigma) d ln(sigma)."""
    ls = np.log(sigmas)
    density = np.asarray(ce, dtype=np.float64).clip(min=0) * np.exp(-0.5 * ((ls - P_mean) / P_std) ** 2)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(ls))])
    if cum[-1] <= 0:
        raise ValueError("the measured loss is zero everywhere; nothing to calibrate on")
    cum /= cum[-1]
    inner = [math.exp(_crossing(ls, cum, k / num_blocks)) for k in range(1, num_blocks)]
    return [sigmas[0], *inner, sigmas[-1]]


def lognormal_fit(sigmas: list[float], ce: list[float]) -> tuple[float, float]:
    """(P_mean, P_std) of a log-normal centred on the CE transition, spanning its 10%-90% rise."""
    ls, curve = np.log(sigmas), monotone(ce)
    lo, hi = curve[0], curve[-1]
    at = lambda f: _crossing(ls, curve, lo + f * (hi - lo))  # noqa: E731
    p10, p50, p90 = at(0.1), at(0.5), at(0.9)
    return p50, max((p90 - p10) / (2 * Z90), 0.05)


def propose(curve: dict, num_blocks: int, P_mean: float, P_std: float) -> dict:
    """Every method's proposal from a measured curve {'sigma': [...], 'ce': [...]}, ascending sigma."""
    from dbscale.diffusion.partition import sigma_boundaries

    s, ce = curve["sigma"], curve["ce"]
    pm, ps = lognormal_fit(s, ce)
    return {
        "ce_levels": {"partition": "calibrated", "boundaries": ce_level_boundaries(s, ce, num_blocks)},
        "loss_integral": {
            "partition": "calibrated",
            "boundaries": loss_integral_boundaries(s, ce, num_blocks, P_mean, P_std),
        },
        "lognormal": {
            "partition": "equiprobable",
            "P_mean": pm,
            "P_std": ps,
            "boundaries_implied": sigma_boundaries(num_blocks, "equiprobable", pm, ps, s[0], s[-1]),
        },
    }
