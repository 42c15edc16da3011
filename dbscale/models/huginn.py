"""The Huginn family (docs/METHOD.md 7c): recurrent depth, trained with truncated BPTT or as a DiffusionBlocks core.

- `HuginnLM` (baseline, after Geiping et al. 2025): prelude -> core iterated r times -> coda, all sandwich-norm
  causal layers of `models/layers.py`. The state starts as Gaussian noise; each iteration feeds the core
  adapter([state; prelude output]). Training draws r = 1 + Poisson(exp(tau)), tau ~ N(ln(mean) - s^2/2, s^2),
  and backpropagates through the last k iterations only (the earlier ones run without a graph), so its
  activation memory grows with k. Inference uses a chosen number of iterations, one KV cache per iteration.
- `HuginnDenoiser` (one DiffusionBlocks block): the recurrent state is the noisy target embedding z_sigma and
  the core is one sigma-conditioned denoiser. The prelude reads the clean context once; core + coda form an
  AR denoiser block of model.block's layout (dbscale's two-stream block by default; the single-stream one,
  noise-conditioned or sigma-free; the paper's) that takes the prelude's features as its clean stream.
  Training runs ONE core pass at a random sigma per step: no BPTT, memory independent of K. Inference: K
  Euler steps of the core, each with its own KV cache; a sigma-free core runs once per token (one cache).
- `HuginnDiffusionLM`: the merged model (B = 1 by default; B > 1 splits the sigma range among cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dbscale.config import Config, ModelConfig
from dbscale.models.layers import (
    Head,
    KVCache,
    RMSNorm,
    TransformerLayer,
    init_weights,
    rope_cos_sin,
    run_layers,
    stream_attention_mask,
)
from dbscale.models.llama import BLOCKS, DiffusionBlocksLM, StreamBlock


@dataclass
class HuginnConfig:
    """The Huginn family's own fields, `model.huginn:` in a config (cfg.model.family_config)."""

    prelude_layers: int = field(default=2, metadata={"help": "Layers of the prelude (run once per token)."})
    core_layers: int = field(
        default=4, metadata={"help": "Layers of the recurrent core (iterated r times, or one Euler step)."}
    )
    coda_layers: int = field(
        default=2, metadata={"help": "Layers of the coda; prelude + core + coda must equal model.n_layers."}
    )
    mean_recurrence: int = field(
        default=32, metadata={"help": "Baseline: mean number of core iterations r during training."}
    )
    recurrence_std: float = field(
        default=0.5,
        metadata={"help": "Baseline: r = 1 + Poisson(exp(tau)), tau ~ N(ln(mean_recurrence) - std^2/2, std^2)."},
    )
    bptt_steps: int = field(
        default=8, metadata={"help": "Baseline: backpropagate through the last k core iterations (all when r < k)."}
    )
    state_init_std: float = field(
        default=1.0, metadata={"help": "Baseline: std of the random initial recurrent state."}
    )
    eval_recurrence: int | None = field(
        default=None, metadata={"help": "Baseline: core iterations at inference; null = mean_recurrence."}
    )


def huginn_section(cfg: ModelConfig) -> HuginnConfig:
    """cfg's Huginn section (the defaults for a ModelConfig built without one)."""
    own = cfg.family_config
    return own if isinstance(own, HuginnConfig) else HuginnConfig()


DEFAULT_EULER_STEPS = 32  # the diffusion core's K when diffusion.sample_steps is null (the baseline's mean r)


def causal_stack(
    layers: nn.ModuleList,
    cfg: ModelConfig,
    x: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache | None = None,
    activation_checkpointing: bool = False,
) -> torch.Tensor:
    """A causal stack over x (B, T, d) at `positions`; with a cache, the tokens are appended to it."""
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    if cache is None:
        return run_layers(layers, x, cos, sin, None, None, None, 0, activation_checkpointing)
    key_pos = positions if cache.positions is None else torch.cat([cache.positions, positions])
    mask = stream_attention_mask(key_pos, torch.ones_like(key_pos, dtype=torch.bool), x.shape[1])
    x = run_layers(layers, x, cos, sin, mask, None, cache, x.shape[1])
    cache.positions = key_pos
    return x


def _layers(cfg: ModelConfig, n: int) -> nn.ModuleList:
    return nn.ModuleList(TransformerLayer(cfg, sandwich=True) for _ in range(n))


def sample_recurrence(rng: np.random.Generator, mean: int, std: float) -> int:
    """r = 1 + Poisson(exp(tau)), tau ~ N(ln(mean) - std^2/2, std^2): E[exp(tau)] = mean (Huginn's schedule)."""
    tau = rng.normal(math.log(mean) - std**2 / 2, std)
    return 1 + int(rng.poisson(math.exp(tau)))


class HuginnCache:
    """KV caches of the baseline: the prelude, one per core iteration (each iteration is its own depth), the coda."""

    def __init__(self, iterations: int):
        self.prelude, self.coda = KVCache(), KVCache()
        self.core = [KVCache() for _ in range(iterations)]

    def __len__(self) -> int:
        return len(self.prelude)


class HuginnLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        d, self.own = cfg.d_model, huginn_section(cfg)
        self.embed_tokens = nn.Embedding(vocab_size, d)
        self.prelude = _layers(cfg, self.own.prelude_layers)
        self.adapter = nn.Linear(2 * d, d, bias=False)  # [state; prelude output] -> core input
        self.core = _layers(cfg, self.own.core_layers)
        self.coda = _layers(cfg, self.own.coda_layers)
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = Head(d, vocab_size)
        self.activation_checkpointing = False
        # (r, k, seed) of the next training forward, set by the trainer: the seed draws the initial state, so a
        # resumed job reproduces an uninterrupted one
        self.recurrence: tuple[int, int, int] | None = None
        init_weights(self, cfg.init_std)

    @property
    def inference_iterations(self) -> int:
        return self.own.eval_recurrence or self.own.mean_recurrence

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: HuginnCache | None = None,
        targets: torch.Tensor | None = None,
        ce_chunk: int = 0,
        iterations: int | None = None,
        bptt: int | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or per-token CE with targets.

        iterations/bptt: r and k (default: the trainer's `recurrence` in training, else the inference count and
        no truncation). k >= r backpropagates through every iteration. state: the initial state (B, T, d);
        default Gaussian noise of std state_init_std from the global generator."""
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        seed = None
        if iterations is None and self.training and self.recurrence is not None:
            iterations, bptt, seed = self.recurrence
        r = iterations or self.inference_iterations
        k = min(bptt or r, r)
        if cache is not None and len(cache.core) != r:
            raise ValueError(f"the cache holds {len(cache.core)} core iterations, the call asks for {r}")
        cfg, ckpt = self.cfg, self.activation_checkpointing
        c = cache
        x = self.embed_tokens(tokens)
        e = causal_stack(self.prelude, cfg, x, positions, None if c is None else c.prelude, ckpt)
        if seed is None and not torch.is_grad_enabled():
            seed = 0  # evaluation without a given state: a fixed draw, so scores are reproducible
        if state is None:
            g = None if seed is None else torch.Generator(device=e.device).manual_seed(seed)
            state = torch.randn(e.shape, generator=g, device=e.device, dtype=e.dtype) * self.own.state_init_std
        s = state
        grad = torch.is_grad_enabled()
        for i in range(r):
            with torch.set_grad_enabled(grad and i >= r - k):  # truncated BPTT: no graph for the early iterations
                x = self.adapter(torch.cat([s, e], dim=-1))
                s = causal_stack(self.core, cfg, x, positions, None if c is None else c.core[i], ckpt)
        h = causal_stack(self.coda, cfg, s, positions, None if c is None else c.coda, ckpt)
        return self.lm_head(self.norm(h), targets, ce_chunk)

    # --- generation interface shared with the other families ------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.cfg.seq_len

    def new_cache(self) -> HuginnCache:
        return HuginnCache(self.inference_iterations)

    def initial_state(self, seed, start: int, n: int) -> torch.Tensor:
        """The initial state (R, n, d) of positions start..start+n-1 of R sequences (seed: an int, or a list of
        R), each drawn from a generator seeded by (seed, position), so cached, uncached and batched generation
        start from the same states."""
        seeds = [seed] if isinstance(seed, int) else list(seed)
        rows = [
            torch.stack(
                [
                    torch.randn(self.cfg.d_model, generator=torch.Generator().manual_seed(s * 1_000_003 + p))
                    for p in range(start, start + n)
                ]
            )
            for s in seeds
        ]
        return torch.stack(rows) * self.own.state_init_std

    @torch.no_grad()
    def next_token_logits(self, cache: HuginnCache, new_tokens: torch.Tensor, seed=0, **sampling) -> torch.Tensor:
        """Append new_tokens (R, n) to the context of R sequences; logits (R, V). seed: an int or one per row."""
        (R, n), start = new_tokens.shape, len(cache)
        positions = torch.arange(start, start + n, device=new_tokens.device)
        state = self.initial_state(seed, start, n).to(new_tokens.device).expand(R, n, -1)
        return self(new_tokens, positions, cache, state=state)[:, -1].float()


class HuginnDenoiser(nn.Module):
    """One block: prelude (clean context, once) + a sigma-conditioned core and coda as an AR denoiser block."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, sigma_data: float, target_embedding=None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        own = huginn_section(cfg)
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.prelude = _layers(cfg, own.prelude_layers)
        self.activation_checkpointing = False
        init_weights(self, cfg.init_std)  # (before the denoiser exists: its zero-inits stay)
        self.denoiser = BLOCKS[cfg.block](  # model.block: dbscale's two-stream or single-stream block, or the paper's
            cfg,
            vocab_size,
            own.core_layers + own.coda_layers,
            sigma_data,
            target_embedding,
            context_features=True,
            sandwich=True,
        )

    @property
    def target_table(self):
        return self.denoiser.target_table

    @property
    def sigma_free(self) -> bool:
        """A sigma-free single-stream core (model.block stream, time_conditioning false): its prior over the
        prelude's features is the same at every sigma, so the chain runs core and coda once per token."""
        return isinstance(self.denoiser, StreamBlock) and self.denoiser.sigma_free

    @property
    def lm_head(self):
        return self.denoiser.lm_head

    def hidden(self, clean, sigma=None, positions=None, cache: KVCache | None = None) -> torch.Tensor:
        """A single-stream core's normed last states over the clean context (ids: the prelude runs first)."""
        self.denoiser.activation_checkpointing = self.activation_checkpointing
        features = clean if clean.is_floating_point() else self.context_features(clean, positions)
        return self.denoiser.hidden(features, sigma, positions, cache)

    def posterior_logits(self, prior: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser.posterior_logits(prior, z, sigma)

    def context_features(self, tokens: torch.Tensor, positions=None, cache: KVCache | None = None) -> torch.Tensor:
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed_tokens(tokens)
        return causal_stack(self.prelude, self.cfg, x, positions, cache, self.activation_checkpointing)

    def forward(
        self,
        clean,
        z,
        sigma,
        clean_pos=None,
        noisy_pos=None,
        cache=None,
        targets=None,
        ce_chunk: int = 0,
        prior_ce: bool = False,
        with_evidence: bool = True,
        follows=None,
        **stream,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the AR blocks' forward; `clean` is token ids (the prelude runs) or the prelude's features.
        stream: a single-stream core's keywords (evidence_at)."""
        self.denoiser.activation_checkpointing = self.activation_checkpointing
        features = clean if clean.is_floating_point() else self.context_features(clean, clean_pos)
        return self.denoiser(
            features, z, sigma, clean_pos, noisy_pos, cache, targets, ce_chunk, prior_ce, with_evidence, follows,
            **stream,
        )  # fmt: skip


class _StepCaches(list):
    """One KV cache per Euler step (as the Llama chain) plus one prelude cache per block."""

    prelude: list[KVCache]


class HuginnDiffusionLM(DiffusionBlocksLM):
    """The merged Huginn DiffusionBlocks model: K Euler steps of the core(s) per token, each step with its own
    KV cache of the clean context; each block's prelude runs once per new token."""

    @staticmethod
    def make_block(cfg: Config, vocab_size: int, n_layers: int, table: torch.Tensor) -> nn.Module:
        return HuginnDenoiser(cfg.model, vocab_size, cfg.diffusion.sigma_data, table)

    def default_steps(self) -> int:
        """K Euler steps of the core per token: diffusion.sample_steps, or DEFAULT_EULER_STEPS."""
        return self.cfg.diffusion.sample_steps or DEFAULT_EULER_STEPS

    def new_cache(self) -> _StepCaches:
        # one per step (each at its fixed sigma), or one per block for sigma-free cores
        caches = _StepCaches(KVCache() for _ in (self.blocks if self.sigma_free else self.sigmas))
        caches.prelude = [KVCache() for _ in self.blocks]
        return caches

    def context_inputs(self, cache, new_tokens, clean_pos):
        return [block.context_features(new_tokens, clean_pos, cache.prelude[b]) for b, block in enumerate(self.blocks)]
