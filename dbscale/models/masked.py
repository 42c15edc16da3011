"""The masked family (docs/METHOD.md 7b): a bidirectional transformer denoiser of partially masked sequences.

- `MaskedDenoiser`: embedding of V symbols + the mask id V, `n_layers` bidirectional layers of
  `models/layers.py` conditioned on t through AdaLN (or unconditioned), final norm and a head over the V
  real symbols only. That is MDLM's SUBS parameterisation: the mask is never predicted (it has no logit),
  and unmasked tokens are copied: the loss reads only masked positions and the sampler only changes them.
  One block is a complete denoiser of L/B layers; the end-to-end baseline is the same class with all L layers.
- `masked_elbo_terms`: the block's part of the continuous-time NELBO (see diffusion/masking.py).
- `MaskedDiffusionLM`: B merged blocks (or the baseline as one block over [0, 1]): the NELBO in bits per
  character summed over the blocks' slices, and MDLM's ancestral sampler, each step served by its block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dbscale.config import Config, ModelConfig, default_layer_allocation
from dbscale.diffusion.masking import MaskSchedule, TPartition, sample_steps, schedule_from_config
from dbscale.models.layers import (
    Head,
    RMSNorm,
    TimestepEmbedder,
    TransformerLayer,
    at_least_fp32,
    init_weights,
    modulate,
    rope_cos_sin,
    run_layers,
    zero_init_adaln,
)


class MaskedDenoiser(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, n_layers: int):
        super().__init__()
        self.cfg, self.vocab_size, self.mask_id = cfg, vocab_size, vocab_size
        d, tc = cfg.d_model, cfg.time_conditioning
        self.embed_tokens = nn.Embedding(vocab_size + 1, d)  # the last id is the mask
        self.time_embed = TimestepEmbedder(d, cfg.time_freq_dim) if tc else None
        self.layers = nn.ModuleList(TransformerLayer(cfg, adaln=tc, causal=False) for _ in range(n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.final_adaLN = nn.Linear(d, 2 * d) if tc else None
        self.lm_head = Head(d, vocab_size)  # V outputs: no logit for the mask (SUBS)
        self.activation_checkpointing = False
        init_weights(self, cfg.init_std)
        zero_init_adaln(self.layers)
        if self.final_adaLN is not None:
            nn.init.zeros_(self.final_adaLN.weight)
            nn.init.zeros_(self.final_adaLN.bias)

    def forward(
        self, tokens: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None = None, ce_chunk: int = 0
    ) -> torch.Tensor:
        """tokens: (B, T) ids in [0, V] (V = mask), t: (B,) in [0, 1]. Logits (B, T, V) over the real
        symbols, or with targets (B, T) the per-token cross-entropy (B, T)."""
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(torch.arange(T, device=tokens.device), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        cond = self.time_embed(t) if self.time_embed is not None else None
        h = run_layers(self.layers, x, cos, sin, None, cond, None, 0, self.activation_checkpointing)
        h = self.norm(h)
        if self.final_adaLN is not None:
            shift, scale = self.final_adaLN(F.silu(cond))[:, None, :].chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.lm_head(h, targets, ce_chunk)


def mask_tokens(window: torch.Tensor, t: torch.Tensor, u: torch.Tensor, schedule: MaskSchedule, mask_id: int):
    """x_t ~ q(x_t | x_0): position i is masked when u_i < 1 - alpha(t). Returns (x_t, masked)."""
    masked = u < (1 - schedule.alpha(t.double())).float()[:, None]
    return torch.where(masked, torch.full_like(window, mask_id), window), masked


def masked_elbo_terms(
    model: nn.Module,
    window: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    schedule: MaskSchedule,
    width: float,
    t_min: float,
    mask_id: int,
    ce_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per sequence of a slice's NELBO part, in nats per token, and the mean CE of masked tokens.

    window: (B, T) clean ids; t: (B,) drawn uniformly over a slice of length `width`; u: (B, T) ~ U(0, 1)
    decides the mask. The integrand is evaluated at t_eff = max(t, t_min):
        width * w(t_eff) * sum_{masked i} CE_i / T,
    an unbiased estimate of the slice's integral up to O(t_min^2) (the integrand is bounded as t -> 0).
    Returns (nelbo (B,), masked CE (B,)), fp32.
    """
    t_eff = t.clamp(min=t_min)
    x_t, masked = mask_tokens(window, t_eff, u, schedule, mask_id)
    token_ce = at_least_fp32(model(x_t, t_eff, targets=window, ce_chunk=ce_chunk))
    masked_ce = (token_ce * masked).sum(dim=1)
    weight = schedule.weight(t_eff.double()).float()
    nelbo = width * weight * masked_ce / window.shape[1]
    return nelbo, (masked_ce / masked.sum(dim=1).clamp(min=1)).detach()


class MaskedDiffusionLM(nn.Module):
    """Merged masked-diffusion model: blocks[b] owns t in intervals[b] (block 0 the most masked slice).

    The end-to-end baseline is the same object with one block of all L layers owning [0, 1]."""

    def __init__(
        self, cfg: Config, vocab_size: int, e2e: bool = False, partition: TPartition | None = None, layers=None
    ):
        """partition: the run's `TPartition` as its manifest records it (default: computed from cfg); layers: each
        block's layer count, as the family allocates them (default: diffusion.layers_per_block or an even split)."""
        super().__init__()
        self.cfg, self.vocab_size, self.mask_id = cfg, vocab_size, vocab_size
        self.schedule = schedule_from_config(cfg.diffusion)
        if e2e:
            alloc, self.intervals = [cfg.model.n_layers], [(0.0, 1.0)]
        else:
            alloc = default_layer_allocation(cfg) if layers is None else layers
            self.intervals = list((partition or TPartition.from_config(cfg.diffusion)).intervals)
        self.blocks = nn.ModuleList(MaskedDenoiser(cfg.model, vocab_size, n) for n in alloc)
        self.time_conditioned = cfg.model.time_conditioning
        self.model_calls = 0  # denoiser evaluations made by the sampler (what the cache saves)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def default_steps(self) -> int:
        return self.cfg.diffusion.sample_steps or self.cfg.model.seq_len

    @torch.no_grad()
    def nelbo_per_window(self, windows: torch.Tensor, num_t: int, seed: int = 0) -> torch.Tensor:
        """NELBO estimate of each (N, T) window in nats per token: for every block, `num_t` stratified times
        in its own slice (one shared offset per window, t_j = lo + (hi - lo)(u + j)/num_t), each with its own
        mask draw, averaged; summed over blocks. Windows are independent, so their spread gives a standard error."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        dev = windows.device
        N, T = windows.shape
        total = torch.zeros(N, dtype=torch.float64)
        for block, (lo, hi) in zip(self.blocks, self.intervals, strict=True):
            offset = torch.rand(N, generator=g, dtype=torch.float64)
            part = torch.zeros(N, dtype=torch.float64)
            for j in range(num_t):
                t = (lo + (hi - lo) * (offset + j) / num_t).float()
                u = torch.rand(N, T, generator=g)
                nelbo, _ = masked_elbo_terms(
                    block, windows, t.to(dev), u.to(dev), self.schedule, hi - lo, self.cfg.diffusion.t_min, self.mask_id
                )
                part += nelbo.double().cpu()
            total += part / num_t
        return total

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        length: int,
        steps: int | None = None,
        seed: int = 0,
        known: torch.Tensor | None = None,
        use_cache: bool = False,
        progress=None,
    ) -> torch.Tensor:
        """MDLM's ancestral sampler from all-mask at t = 1 to t = 0 in `steps` steps (equal decrements of alpha).

        Step k (t -> s) reveals each still-masked position with probability (alpha(s) - alpha(t)) / (1 - alpha(t))
        as a draw from the denoiser's distribution; revealed and `known` positions never change (SUBS). Step k is
        served by block floor(k B / steps). `known`: (num_samples, length) ids, -1 where unknown (prefix or
        infilling). use_cache: reuse the previous step's distribution when no position changed and the same block
        serves the next step; exact only for a model without time conditioning, so it is refused otherwise.
        """
        steps = steps or self.default_steps()
        if use_cache and self.time_conditioned:
            raise ValueError(
                "the cached sampler reuses a step's prediction at the next t, which is exact only for a denoiser "
                "without time conditioning (model.time_conditioning: false); this model is time-conditioned."
            )
        explicit = None if self.num_blocks == 1 else self.cfg.diffusion.t_boundaries
        times, step_blocks = sample_steps(steps, self.num_blocks, self.schedule, explicit)
        dev = next(self.parameters()).device
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.full((num_samples, length), self.mask_id, dtype=torch.long)
        if known is not None:
            if known.shape != x.shape:
                raise ValueError(f"known has shape {tuple(known.shape)}, expected {tuple(x.shape)}")
            x = torch.where(known >= 0, known.long().cpu(), x)
        probs, probs_block, changed = None, None, True
        for k in range(steps):
            t, s, b = times[k], times[k + 1], step_blocks[k]
            if probs is None or changed or not use_cache or probs_block != b:
                tt = torch.full((num_samples,), t, device=dev)
                probs = self.blocks[b](x.to(dev), tt).float().softmax(-1).cpu()
                probs_block = b
                self.model_calls += 1
            a_t, a_s = float(self.schedule.alpha(t)), float(self.schedule.alpha(s))
            reveal_p = 1.0 if s == 0.0 else (a_s - a_t) / (1 - a_t)
            draw = torch.rand(num_samples, length, generator=g)
            proposal = torch.multinomial(probs.view(-1, self.vocab_size), 1, generator=g).view(num_samples, length)
            reveal = (x == self.mask_id) & (draw < reveal_p)
            changed = bool(reveal.any())
            x = torch.where(reveal, proposal, x)
            if progress is not None:
                progress.update(1)
        return x


def bits(nats: float) -> float:
    return nats / math.log(2)
