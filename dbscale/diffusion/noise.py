"""EDM noise: preconditioning, loss weight, truncated log-normal sampling.

Karras et al. 2022 ("EDM"), Table 1, with the DiffusionBlocks constants of docs/METHOD.md section 2:
forward process z_sigma = y + sigma * eps (variance exploding), ln sigma ~ N(P_mean, P_std^2).
"""

from __future__ import annotations

import math

import torch


def edm_precond(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM Table 1 preconditioning. sigma: any shape. Returns (c_skip, c_out, c_in, c_noise), same shape."""
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM Eq. 8 weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (makes the effective weight 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def lognormal_cdf(sigma: float, P_mean: float, P_std: float) -> float:
    """P(sigma' <= sigma) for ln sigma' ~ N(P_mean, P_std^2)."""
    return 0.5 * math.erfc(-(math.log(sigma) - P_mean) / (P_std * math.sqrt(2)))


def lognormal_icdf(q: float, P_mean: float, P_std: float) -> float:
    """Inverse of `lognormal_cdf`."""
    z = torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()
    return math.exp(P_mean + P_std * z)


def sample_truncated_lognormal(
    n: int,
    lo: float,
    hi: float,
    P_mean: float,
    P_std: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n draws of sigma from the log-normal truncated to [lo, hi], by inverse CDF (docs/METHOD.md section 3).

    Returns a float64 tensor of shape (n,); the caller casts. float64 keeps the tails of [0.002, 80] exact.
    """
    q_lo = lognormal_cdf(lo, P_mean, P_std)
    q_hi = lognormal_cdf(hi, P_mean, P_std)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    q = q_lo + u * (q_hi - q_lo)
    sigma = torch.exp(P_mean + P_std * torch.special.ndtri(q))
    return sigma.clamp(lo, hi)


def frozen_target_embedding(vocab_size: int, dim: int, seed: int) -> torch.Tensor:
    """The run's shared target space: a seeded Gaussian table with unit-L2-norm rows (docs/METHOD.md 4)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab_size, dim, generator=g, dtype=torch.float32)
    return table / table.norm(dim=-1, keepdim=True).clamp(min=1e-12)
