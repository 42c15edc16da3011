"""An ensemble of independently trained causal LMs read as one LM: the baseline a DiffusionBlocks chain of B blocks
must beat to show that its blocks compute more together than B shallow models trained alone (docs/results/depth.md).

Two ways to combine members' next-token distributions p_m:
- 'product' (product of experts): log p = mean_m log p_m, renormalised;
- 'mixture': p = mean_m p_m.
Both are exact per position, so the ensemble generates with the members' own KV caches and scores teacher-forced
windows like any plain LM (`forward`, `next_token_logits`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ENSEMBLE_MODES = ("product", "mixture")


def combine(logits: list[torch.Tensor], mode: str) -> torch.Tensor:
    """Normalised log-probabilities (..., V) of the ensemble of members' logits (..., V)."""
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode {mode!r}: choose one of {', '.join(ENSEMBLE_MODES)}")
    logps = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])
    if mode == "product":
        return torch.log_softmax(logps.mean(0), dim=-1)
    return torch.logsumexp(logps, dim=0) - math.log(len(logits))


class EnsembleLM(nn.Module):
    """Plain causal LMs (LlamaLM, or anything with their interface) of one vocabulary, read as one."""

    def __init__(self, members: list[nn.Module], mode: str = "product"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble mode {mode!r}: choose one of {', '.join(ENSEMBLE_MODES)}")
        self.members, self.mode = nn.ModuleList(members), mode

    def forward(self, tokens: torch.Tensor, positions=None, cache=None) -> torch.Tensor:
        """tokens (B, T) -> the ensemble's log-probabilities (B, T, V); cache: one per member (new_cache)."""
        caches = cache if cache is not None else [None] * len(self.members)
        return combine([m(tokens, positions, c) for m, c in zip(self.members, caches, strict=True)], self.mode)

    @property
    def context_length(self) -> int:
        return min(m.context_length for m in self.members)

    def new_cache(self) -> list:
        return [m.new_cache() for m in self.members]

    @torch.no_grad()
    def next_token_logits(self, cache: list, new_tokens: torch.Tensor, seed=0, **sampling) -> torch.Tensor:
        """As LlamaLM.next_token_logits: the ensemble's log-probabilities (R, V) for the token after new_tokens."""
        logits = [
            m.next_token_logits(c, new_tokens, seed, **sampling) for m, c in zip(self.members, cache, strict=True)
        ]
        return combine(logits, self.mode)
