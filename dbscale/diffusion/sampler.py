"""The sampler across blocks (docs/METHOD.md section 6): Euler or ancestral steps, and the clean estimate a step
hands on.

The probability-flow ODE of the VE process, dz/dsigma = (z - D(z, sigma)) / sigma, integrated with Euler
steps from sigma_max to sigma_min; step k is served by block steps_to_blocks(N, B)[k]. (The paper's Eq. 5
prints the opposite sign; this is the correct one.) The ancestral step draws from the VE forward process's
posterior q(z_next | z, y = D) instead (Ho et al. 2020, Eq. 6-7, with alpha = 1 and variances sigma^2).

For token targets D is formed from the step's logits over the frozen target table E: the softmax mean (the
paper), the embedding of the most likely token (Diffusion-LM's clamping, Li et al. 2022, section 4.2), or the
embedding of a token drawn from the step's distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

ESTIMATES = ("mean", "argmax", "sample")
STEPS = ("euler", "ancestral")


def euler_step(z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """z <- z + (sigma_next - sigma) * (z - D) / sigma."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def ancestral_step(
    z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, noise: torch.Tensor
) -> torch.Tensor:
    """A draw from q(z_next | z, y = D) of z_s = y + s * eps: mean r*z + (1-r)*D, variance sigma_next^2 (1-r),
    with r = sigma_next^2 / sigma^2. noise ~ N(0, I), the shape of z."""
    r = (sigma_next / sigma) ** 2
    return r * z + (1 - r) * denoised + sigma_next * math.sqrt(1 - r) * noise


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely entries with mass >= top_p along the last dim, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def draw_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Tokens (...) drawn from softmax(logits / temperature) cut to its top-p nucleus, by inverse CDF with the
    given uniforms u (...) in [0, 1): the same u give the same token in a batch of one or of many.
    temperature <= 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u.float() * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True)
    return index.squeeze(-1).clamp(max=logits.shape[-1] - 1)


def clean_estimate(
    logits: torch.Tensor,
    table: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
    top_p: float = 1.0,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """The estimate of the clean target (..., e) from a step's logits (..., V) over the table E (V, e), or over
    per-row tables (..., V', e) (a sampler restricted to candidate tokens: row r's logits index its own table)."""
    per_row = table.dim() > 2
    if kind == "mean":  # probabilities in fp32; the product in the table's dtype (bf16 weights: bf16), result fp32
        probs = logits.float().softmax(-1)
        if per_row:
            return (probs.to(table.dtype).unsqueeze(-2) @ table).squeeze(-2).to(probs.dtype)
        return (probs.to(table.dtype) @ table).to(probs.dtype)
    if kind == "argmax" or temperature <= 0:
        index = logits.argmax(-1)
    elif kind == "sample":
        index = draw_tokens(logits, temperature, top_p, u)
    else:
        raise ValueError(f"unknown estimate '{kind}' (one of {ESTIMATES})")
    if per_row:
        return table.gather(-2, index[..., None, None].expand(*index.shape, 1, table.shape[-1])).squeeze(-2)
    return table[index]


def sample_chain(
    denoise: Callable[[int, int, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]],
    z: torch.Tensor,
    sigmas: Sequence[float],
    step_blocks: Sequence[int],
    step: str = "euler",
    step_noise: Callable[[int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chain. `denoise(step, block, z, sigma)` returns (D, logits).

    z: the starting state, already drawn from N(0, sigmas[0]^2 I). `step_noise(k)`: the N(0, I) draw of the
    ancestral step after step k. Returns (final logits, final D), both from the last call, made at sigmas[-1]
    (= sigma_min).
    """
    if len(sigmas) != len(step_blocks):
        raise ValueError("one block per step")
    logits = denoised = None
    for k, (sigma, block) in enumerate(zip(sigmas, step_blocks, strict=True)):
        denoised, logits = denoise(k, block, z, sigma)
        if k + 1 < len(sigmas):
            if step == "euler":
                z = euler_step(z, denoised, sigma, sigmas[k + 1])
            else:
                z = ancestral_step(z, denoised, sigma, sigmas[k + 1], step_noise(k))
    return logits, denoised
