"""EDM preconditioning identities, truncated log-normal sampling, and the Euler sampler."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dbscale.diffusion.noise import edm_loss_weight, edm_precond, sample_truncated_lognormal
from dbscale.diffusion.sampler import euler_step, sample_chain


def test_precond_golden_values_at_sigma_data():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor([sd], dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))
    assert c_noise.item() == pytest.approx(math.log(sd) / 4)


def test_precond_identities_over_the_range():
    sd = 0.5
    s = torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond(s, sd)
    # EDM Eq. 7 derivation: the network's target has unit variance and the effective loss weight is 1.
    target_var = (sd**2 - 2 * c_skip * sd**2 + c_skip**2 * (sd**2 + s**2)) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(s))
    torch.testing.assert_close(edm_loss_weight(s, sd) * c_out**2, torch.ones_like(s))
    torch.testing.assert_close(c_in**2 * (s**2 + sd**2), torch.ones_like(s))  # unit-variance input


def test_truncated_lognormal_matches_scipy():
    lo, hi, P_mean, P_std = 0.1341, 0.3012, -1.2, 1.2
    g = torch.Generator().manual_seed(0)
    s = sample_truncated_lognormal(20000, lo, hi, P_mean, P_std, generator=g).numpy()
    assert s.min() >= lo and s.max() <= hi
    a, b = (np.log(lo) - P_mean) / P_std, (np.log(hi) - P_mean) / P_std
    ks = stats.kstest(np.log(s), stats.truncnorm(a, b, loc=P_mean, scale=P_std).cdf)
    assert ks.pvalue > 0.01


def test_truncated_lognormal_reaches_the_far_tails():
    g = torch.Generator().manual_seed(1)
    s = sample_truncated_lognormal(5000, 0.6766, 80.0, -1.2, 1.2, generator=g)
    assert s.min() >= 0.6766 and s.max() <= 80.0 and s.max() > 5.0


def test_euler_with_exact_denoiser_contracts_to_target():
    """With D = y at every step, z - y scales by sigma_next/sigma per step: it telescopes to s_min/s_max."""
    torch.manual_seed(0)
    y = torch.randn(3, 8, dtype=torch.float64)
    z0 = y + 80.0 * torch.randn(3, 8, dtype=torch.float64)
    sigmas = [80.0, 1.0, 0.3, 0.05, 0.002]
    calls = []

    def denoise(step, block, z, sigma):
        calls.append((step, block, sigma))
        return y, z

    _, last_d = sample_chain(denoise, z0, sigmas, [0, 0, 1, 1, 1])
    z = z0
    for s, s_next in zip(sigmas, sigmas[1:]):
        z = euler_step(z, y, s, s_next)
    torch.testing.assert_close(z - y, (z0 - y) * (0.002 / 80.0))
    assert [c[1] for c in calls] == [0, 0, 1, 1, 1] and [c[2] for c in calls] == sigmas
    torch.testing.assert_close(last_d, y)


def test_euler_step_sign_moves_toward_the_denoised_estimate():
    z, d = torch.tensor([2.0]), torch.tensor([0.0])
    assert euler_step(z, d, 1.0, 0.5).item() == pytest.approx(1.0)  # halfway to D when sigma halves
    assert euler_step(z, d, 1.0, 0.0).item() == pytest.approx(0.0)
