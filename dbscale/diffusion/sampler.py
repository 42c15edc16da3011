"""Deterministic Euler sampler across blocks (METHOD.md section 6).

The probability-flow ODE of the VE process, dz/dsigma = (z - D(z, sigma)) / sigma, integrated with Euler
steps from sigma_max to sigma_min; step k is served by block steps_to_blocks(N, B)[k]. (The paper's Eq. 5
prints the opposite sign; this is the correct one.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """z <- z + (sigma_next - sigma) * (z - D) / sigma."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def sample_chain(
    denoise: Callable[[int, int, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
    z: torch.Tensor,
    sigmas: Sequence[float],
    step_blocks: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chain. `denoise(step, block, z, sigma)` returns (D, logits).

    z: the starting state, already drawn from N(0, sigmas[0]^2 I). Returns (final logits, final D),
    both from the last call, made at sigmas[-1] (= sigma_min).
    """
    if len(sigmas) != len(step_blocks):
        raise ValueError("one block per step")
    logits = denoised = None
    for k, (sigma, block) in enumerate(zip(sigmas, step_blocks, strict=True)):
        denoised, logits = denoise(k, block, z, sigma)
        if k + 1 < len(sigmas):
            z = euler_step(z, denoised, sigma, sigmas[k + 1])
    return logits, denoised
