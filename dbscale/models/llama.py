"""The Llama family: the end-to-end AR baseline, the AR denoiser blocks, and the merged block chain.

Training windows hold seq_len + 1 tokens x_0..x_T. Both models learn p(x_i | x_<i) for i = 1..T:
- `LlamaLM` (baseline): causal transformer over x_0..x_{T-1}, logits for x_1..x_T.
- the denoiser block of one slice of sigma, in one of three layouts (model.block, docs/METHOD.md 5b, 5c, 7a):
  `DenoiserBlock` ('two_stream'): the clean stream x_0..x_{T-1} at positions 0..T-1 and one noisy row per
  target at positions 1..T, concatenated [clean; noisy]; noisy row i sees itself and clean x_j for j < i,
  reads the token it follows, and its logits are a prior plus the exact evidence <z_i, E_v> / sigma^2.
  `StreamBlock` ('stream'): one causal pass over the clean tokens; row i-1 gives the prior for x_i, plus the
  same evidence. `PaperBlock` ('paper'): the two-stream layout with the paper's noisy input in_proj(c_in z)
  and EDM readout D = c_skip*z + c_out*F, then an AdaLN-modulated norm and the head.
- `DiffusionBlocksLM`: the B merged blocks; per new token, one Euler step per block, each step with its
  own KV cache of the clean context (valid because a step is always taken at the same sigma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbscale.config import Config, ModelConfig, default_layer_allocation
from dbscale.diffusion.noise import edm_loss_weight, edm_precond, frozen_target_embedding  # noqa: F401 (re-export)
from dbscale.diffusion.partition import Partition, default_num_steps, step_sigmas, steps_to_blocks
from dbscale.diffusion.sampler import clean_estimate, sample_chain
from dbscale.models.layers import (
    Head,
    KVCache,
    RMSNorm,
    TimestepEmbedder,
    TransformerLayer,
    at_least_fp32,
    init_weights,
    modulate,
    rope_cos_sin,
    run_layers,
    stream_attention_mask,
    zero_init_adaln,
)


class LlamaLM(nn.Module):
    """End-to-end Llama-2 style causal LM: the baseline every DiffusionBlocks run is compared with."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Head(cfg.d_model, vocab_size)
        self.activation_checkpointing = False
        init_weights(self, cfg.init_std)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        ce_chunk: int = 0,
    ) -> torch.Tensor:
        """tokens: (B, T) -> logits (B, T, V). With a cache, the tokens are appended to it.
        With targets (B, T): the per-token cross-entropy (B, T) instead (chunked by `ce_chunk`)."""
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = None
        if cache is not None:
            key_pos = positions if cache.positions is None else torch.cat([cache.positions, positions])
            mask = stream_attention_mask(key_pos, torch.ones_like(key_pos, dtype=torch.bool), T)
        x = run_layers(
            self.layers,
            x,
            cos,
            sin,
            mask,
            None,
            cache,
            T if cache is not None else 0,
            self.activation_checkpointing,
        )
        if cache is not None:
            cache.positions = key_pos
        return self.lm_head(self.norm(x), targets, ce_chunk)

    # --- generation interface shared with DiffusionBlocksLM -----------------------------------------------
    @property
    def context_length(self) -> int:
        return self.cfg.seq_len

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.no_grad()
    def next_token_logits(self, cache: KVCache, new_tokens: torch.Tensor, seed=0, **sampling) -> torch.Tensor:
        """Append new_tokens (R, n) to the context of R sequences; logits (R, V) for the token after them.
        (`seed` and `sampling`: the chain's draws, temperature and top_p; a plain LM draws nothing here and
        applies temperature / top_p to these logits instead.)"""
        start = len(cache)
        positions = torch.arange(start, start + new_tokens.shape[1], device=new_tokens.device)
        return self(new_tokens, positions, cache)[:, -1].float()


def block_reads_table(cfg: ModelConfig) -> bool:
    """Whether a denoiser block needs the run's frozen target table at run time (beyond its noisy targets):
    dbscale's blocks add the evidence of z from it; the paper's reads it only for a 'target' head or context."""
    return cfg.block != "paper" or "target" in (cfg.head, cfg.context_embedding)


def block_has_prior(cfg: ModelConfig) -> bool:
    """Whether a denoiser block's logits split into a context-only prior plus the evidence of z (dbscale's
    posterior readout; not the paper's EDM readout), so that diffusion.prior_loss can train the prior on its own."""
    return cfg.block != "paper"


def denoiser_block(
    cfg: ModelConfig,
    vocab_size: int,
    n_layers: int,
    sigma_data: float,
    table: torch.Tensor | None,
    stacked: bool = False,
) -> nn.Module:
    """The AR denoiser block that model.block names; stacked: it reads its predecessor's features
    (diffusion.stack_context, a sigma-free single-stream block after the first)."""
    if stacked:
        return StreamBlock(cfg, vocab_size, n_layers, sigma_data, table, context_features=True)
    return BLOCKS[cfg.block](cfg, vocab_size, n_layers, sigma_data, table)


class _BlockInputs(nn.Module):
    """What both AR block layouts derive from their inputs: the clean context's embedding and the noise level's
    conditioning (needs `time_embed`, `layers` and `final_adaLN`)."""

    def time_conditioning(self, c_noise: torch.Tensor, cache: KVCache | None = None) -> tuple[list, tuple]:
        """What the block derives from its noise level alone: every layer's adaLN modulation and the final
        (shift, scale), from c_noise (B,). A generation cache serves one step, at one sigma for every row, so
        it keeps them and later tokens skip the time embedder and the adaLN products (exact: the same
        values; those weights are a third of a layer's). Kept only without autograd and for a uniform sigma."""
        uniform = cache is not None and not torch.is_grad_enabled() and bool((c_noise == c_noise[0]).all())
        if uniform:
            key = float(c_noise[0])
            if cache.conditioning is not None and cache.conditioning[0] == key:
                return cache.conditioning[1]
            c_noise = c_noise[:1]  # (1, 1, .) modulations broadcast over the rows
        cond = self.time_embed(c_noise)
        value = [layer.modulation(cond) for layer in self.layers], self.final_adaLN(F.silu(cond))[:, None].chunk(2, -1)
        if uniform:
            cache.conditioning = (key, value)
        return value

    def embed_context(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.context_features:
            if tokens.is_floating_point():
                return tokens  # already features
            return self.predecessor_features(tokens)
        if self.cfg.context_embedding == "learned":
            return self.embed_tokens(tokens)
        return self.ctx_proj(self.target_table[tokens].to(self.ctx_proj.weight.dtype))

    def _inputs(self, cfg, vocab_size: int, sigma_data: float, table, context_features: bool, needs_table: str):
        """What both layouts keep: the config, the frozen target table as a non-persistent buffer (checked
        against (V, e) when `needs_table` names what reads it) and the clean context's input."""
        self.cfg, self.vocab_size, self.sigma_data = cfg, vocab_size, sigma_data
        if needs_table:
            if table is None or tuple(table.shape) != (vocab_size, cfg.embed_dim):
                got = None if table is None else tuple(table.shape)
                raise ValueError(f"{needs_table} needs the ({vocab_size}, {cfg.embed_dim}) target table, got {got}")
            self.register_buffer("target_table", table, persistent=False)
        else:
            self.target_table = None
        self._context_input(cfg, vocab_size, context_features)

    def _context_input(self, cfg: ModelConfig, vocab_size: int, context_features: bool) -> None:
        self.context_features = context_features  # the caller passes (B, Tc, d) features (Huginn's prelude output)
        if context_features:
            pass
        elif cfg.context_embedding == "learned":
            self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)  # the clean context
        else:
            self.ctx_proj = nn.Linear(cfg.embed_dim, cfg.d_model, bias=False)  # read from the frozen table


class _TwoStreamBlock(_BlockInputs):
    """The two-stream layout (docs/METHOD.md 7a): `n_layers` AdaLN layers over [clean; noisy] rows, the clean
    stream x_0..x_{Tc-1} and one noisy row per target; a noisy row sees itself and the clean tokens before it,
    a clean row never sees a noisy one. Then out_proj into the target space, an AdaLN-modulated final norm and
    the head. What the noisy rows read (`noisy_input`) and how their output becomes logits (`readout`) is
    the layout's."""

    reads_z = False  # the paper's noisy input: in_proj(c_in * z_sigma) on the noisy rows
    has_prior = True  # the logits split into a prior and the evidence of z (prior_ce, with_evidence)

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        n_layers: int,
        sigma_data: float,
        target_embedding: torch.Tensor | None = None,
        context_features: bool = False,
        sandwich: bool = False,
    ):
        super().__init__()
        d, e = cfg.d_model, cfg.embed_dim
        self._inputs(cfg, vocab_size, sigma_data, target_embedding, context_features, self.table_reader(cfg))
        if self.reads_z:
            self.in_proj = nn.Linear(e, d, bias=False)
        self.time_embed = TimestepEmbedder(d, cfg.time_freq_dim)
        self.layers = nn.ModuleList(TransformerLayer(cfg, adaln=True, sandwich=sandwich) for _ in range(n_layers))
        self.out_proj = nn.Linear(d, e, bias=False)  # F: hidden -> target space
        self.norm = RMSNorm(e, cfg.norm_eps)
        self.final_adaLN = nn.Linear(d, 2 * e)
        self.lm_head = Head(e, vocab_size, cfg.head)  # 'target' heads start at zero
        self.activation_checkpointing = False
        init_weights(self, cfg.init_std)
        zero_init_adaln(self.layers)
        for zero in [self.final_adaLN, *self.zero_at_init()]:  # the final modulation starts as the identity
            nn.init.zeros_(zero.weight)
            if getattr(zero, "bias", None) is not None:
                nn.init.zeros_(zero.bias)

    @staticmethod
    def table_reader(cfg: ModelConfig) -> str:
        """What reads the frozen target table at run time ('' for nothing: then none is kept)."""
        return "the posterior readout"

    def zero_at_init(self) -> list[nn.Module]:
        """The modules that start at zero besides the final modulation."""
        return []

    def forward(
        self,
        clean_tokens: torch.Tensor,
        z: torch.Tensor,
        sigma: torch.Tensor,
        clean_pos: torch.Tensor | None = None,
        noisy_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        ce_chunk: int = 0,
        prior_ce: bool = False,
        with_evidence: bool = True,
        follows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """clean_tokens: (B, Tc) ids (or (B, Tc, d) features with context_features), z: (B, Tn, e) noisy
        targets, sigma: (B,). Default positions are the training layout (clean 0..Tc-1, noisy 1..Tn): noisy
        position i follows clean token i-1, the last Tn clean inputs of the call; `follows` (Tn,) indexes them
        otherwise (a step on a subset of positions passes it with noisy_pos; read by a block whose noisy rows
        read that token). With a cache, the clean tokens are appended to it. Returns (D or None, logits
        (B, Tn, V)), or with targets the per-token cross-entropy (B, Tn) in the logits' place; prior_ce (a block
        with a prior): (B, Tn, 2), the posterior's and the prior's (head(norm(F)) alone, the context-only
        prediction), see Head; with_evidence=False: the prior's logits or CE alone.
        """
        if (prior_ce or not with_evidence) and not self.has_prior:
            raise ValueError("the paper's block (EDM readout) has no separate prior; dbscale's blocks have one")
        B = clean_tokens.shape[0]
        c_skip, c_out, c_in, c_noise = (c.view(B, 1, 1) for c in edm_precond(at_least_fp32(sigma), self.sigma_data))
        mods, (shift, scale) = self.time_conditioning(c_noise.view(B), cache)
        z = at_least_fp32(z)
        context = self.embed_context(clean_tokens)
        h = self._noisy_hidden(context, self.noisy_input(context, z, c_in, follows), clean_pos, noisy_pos, cache, mods)
        return self.readout(h, z, sigma, c_skip, c_out, shift, scale, targets, ce_chunk, prior_ce, with_evidence)

    def _noisy_hidden(self, context, noisy, clean_pos, noisy_pos, cache, mods) -> torch.Tensor:
        """Run the layers over [context; noisy] ((B, Tc, d) and (B, Tn, d) inputs) and return the noisy rows'
        last hidden states (B, Tn, d). With a cache, the clean rows are appended to it (noisy ones never are)."""
        Tc, Tn, dev = context.shape[1], noisy.shape[1], noisy.device
        if clean_pos is None:
            clean_pos = torch.arange(Tc, device=dev)
        if noisy_pos is None:
            noisy_pos = torch.arange(1, Tn + 1, device=dev)
        x = torch.cat([context, noisy], dim=1)
        new_pos = torch.cat([clean_pos, noisy_pos])
        new_clean = torch.cat(
            [torch.ones(Tc, dtype=torch.bool, device=dev), torch.zeros(Tn, dtype=torch.bool, device=dev)]
        )
        if cache is not None and cache.positions is not None:
            key_pos = torch.cat([cache.positions, new_pos])
            key_clean = torch.cat([torch.ones_like(cache.positions, dtype=torch.bool), new_clean])
        else:
            key_pos, key_clean = new_pos, new_clean
        mask = stream_attention_mask(key_pos, key_clean, Tc + Tn)
        cos, sin = rope_cos_sin(new_pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        h = run_layers(self.layers, x, cos, sin, mask, None, cache, Tc, self.activation_checkpointing, mods)
        if cache is not None and Tc:
            cache.positions = clean_pos if cache.positions is None else torch.cat([cache.positions, clean_pos])
        return h[:, Tc:]


class DenoiserBlock(_TwoStreamBlock):
    """dbscale's two-stream AR block (model.block 'two_stream', docs/METHOD.md 5b): noisy row i reads the
    context input of the token it follows, x_{i-1}, and z enters only through the posterior readout,
    logits = head(norm(F)) + <z, E_v> / sigma^2 (the network gives the context's prior; the exact Gaussian
    evidence of each target row E_v is added). Normal readout init: no saddle at the start. Knows nothing
    about other blocks; the frozen target table is kept as a non-persistent buffer (it belongs to the run)."""

    def noisy_input(self, context, z, c_in, follows):
        Tc, Tn = context.shape[1], z.shape[1]
        if Tc < Tn:
            raise ValueError(f"{Tn} noisy positions follow {Tc} clean tokens")
        return context[:, Tc - Tn :] if follows is None else context[:, follows]  # the token each one follows

    def readout(self, h, z, sigma, c_skip, c_out, shift, scale, targets, ce_chunk, prior_ce, with_evidence):
        # log p(v | context, z) = log p(v | context) + <z, E_v> / sigma^2 + const: the rows E_v have unit
        # norm, so the Gaussian likelihood N(z; E_v, sigma^2 I) differs between tokens by that term alone.
        evidence = (z / at_least_fp32(sigma).view(-1, 1, 1) ** 2, self.target_table) if with_evidence else None
        h_out = modulate(self.norm(self.out_proj(h)), shift, scale)
        return None, self.lm_head(h_out, targets, ce_chunk, self.target_table, evidence, prior_ce)


class PaperBlock(_TwoStreamBlock):
    """The paper's AR block (model.block 'paper'; DiffusionBlocks' public code): the noisy stream reads
    in_proj(c_in * z) only, the readout is EDM's D = c_skip*z + c_out*F (Eq. 7) through the modulated norm
    and the head, and out_proj and the head start at zero (a fresh block returns c_skip*z and a uniform
    prediction). Returns (D, logits), D (B, Tn, e) in fp32 the denoised estimate. Kept beside dbscale's
    block so the two can be compared (bench/denoiser_learning.py)."""

    reads_z, has_prior = True, False

    @staticmethod
    def table_reader(cfg: ModelConfig) -> str:
        return "head/context 'target'" if block_reads_table(cfg) else ""

    def zero_at_init(self) -> list[nn.Module]:
        return [self.out_proj] + ([self.lm_head] if self.cfg.head == "learned" else [])

    def noisy_input(self, context, z, c_in, follows):
        return self.in_proj((c_in * z).to(self.out_proj.weight.dtype))  # no noisy row reads a clean token

    def readout(self, h, z, sigma, c_skip, c_out, shift, scale, targets, ce_chunk, prior_ce, with_evidence):
        D = c_skip * z + c_out * at_least_fp32(self.out_proj(h))  # EDM Eq. 7
        h_out = modulate(self.norm(D.to(self.out_proj.weight.dtype)), shift, scale)
        return D, self.lm_head(h_out, targets, ce_chunk, self.target_table)


class StreamBlock(_BlockInputs):
    """The single-stream AR denoiser block (model.block 'stream', docs/METHOD.md 5c): `n_layers` layers over the
    clean tokens x_0..x_{T-1}, as a causal LM; row i-1's output through the final norm and the head is the prior
    logits for x_i, and the head adds the exact Gaussian evidence of that position's noisy target,
    logits_i = prior_i + <z_i, E_v> / sigma_i^2. z enters nowhere else, so nothing is computed twice.

    Noise-conditioned (model.time_conditioning true): adaLN layers and final norm from sigma (one per sequence).
    Sigma-free (false): the plain pre-norm layers of the end-to-end LM; the prior is the same at every sigma, so
    sigma may be drawn per position and the sampler runs the layers once per token (`sigma_free`)."""

    single_stream = True

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        n_layers: int,
        sigma_data: float,
        target_embedding: torch.Tensor | None = None,
        context_features: bool = False,
        sandwich: bool = False,
    ):
        super().__init__()
        d = cfg.d_model
        self._inputs(
            cfg, vocab_size, sigma_data, target_embedding, context_features, "the single-stream block's evidence"
        )
        self.sigma_free = not cfg.time_conditioning
        if not self.sigma_free:
            self.time_embed = TimestepEmbedder(d, cfg.time_freq_dim)
        adaln = not self.sigma_free
        self.layers = nn.ModuleList(TransformerLayer(cfg, adaln=adaln, sandwich=sandwich) for _ in range(n_layers))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.final_adaLN = None if self.sigma_free else nn.Linear(d, 2 * d)
        self.lm_head = Head(d, vocab_size)
        self.activation_checkpointing = False
        init_weights(self, cfg.init_std)
        if adaln:
            zero_init_adaln(self.layers)
            nn.init.zeros_(self.final_adaLN.weight)  # the final modulation starts as the identity
            nn.init.zeros_(self.final_adaLN.bias)

    def read_from(self, predecessors: list[StreamBlock]) -> None:
        """Stacked context (diffusion.stack_context), training: token ids given to this block pass first through
        the frozen `predecessors` (blocks 0..b-1, in order), whose last residual stream is this block's input.
        They are kept outside the module's parameters and state (no optimizer, checkpoint or gradient sees them)."""
        for block in predecessors:
            block.requires_grad_(False)
            block.eval()
        self.__dict__["_predecessors"] = list(predecessors)

    @torch.no_grad()
    def predecessor_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the frozen predecessors hand this block for the clean tokens (B, Tc): their last residual stream."""
        predecessors = self.__dict__.get("_predecessors")
        if predecessors is None:
            raise ValueError(
                "this block reads its predecessor's features (diffusion.stack_context) and was given token ids "
                "without its frozen predecessors (read_from)"
            )
        x = tokens
        for block in predecessors:
            block.to(tokens.device)
            x = block.residual(x)
        return x.to(self.norm.weight.dtype)

    def residual(
        self,
        clean_tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mods: list | None = None,
    ) -> torch.Tensor:
        """The last layer's residual stream (B, Tc, d), before the final norm: what a stacked successor reads.
        mods: every layer's adaLN modulation (a noise-conditioned block)."""
        Tc = clean_tokens.shape[1]
        x = self.embed_context(clean_tokens)
        if positions is None:
            positions = torch.arange(Tc, device=x.device)
        mask = None
        if cache is not None:
            key_pos = positions if cache.positions is None else torch.cat([cache.positions, positions])
            mask = stream_attention_mask(key_pos, torch.ones_like(key_pos, dtype=torch.bool), Tc)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        h = run_layers(self.layers, x, cos, sin, mask, None, cache, Tc, self.activation_checkpointing, mods)
        if cache is not None:
            cache.positions = key_pos
        return h

    def hidden(
        self,
        clean_tokens: torch.Tensor,
        sigma: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The normed (and, noise-conditioned, modulated) last-layer states (B, Tc, d) of the clean tokens
        (B, Tc) ids or (B, Tc, d) features; row j reads x_0..x_j and gives the prior for x_{j+1}. With a cache,
        the tokens are appended to it. sigma (B,) is read only by a noise-conditioned block."""
        conditioning = None
        if not self.sigma_free:
            if sigma is None or sigma.dim() != 1:
                raise ValueError("a noise-conditioned block takes one sigma per sequence, (B,)")
            c_noise = edm_precond(at_least_fp32(sigma), self.sigma_data)[3]
            conditioning = self.time_conditioning(c_noise, cache)
        h = self.residual(clean_tokens, positions, cache, None if conditioning is None else conditioning[0])
        h = self.norm(h)
        if conditioning is None:
            return h
        shift, scale = conditioning[1]
        return modulate(h, shift, scale)

    def evidence(self, z: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z / sigma^2, E) for the head: the Gaussian log-likelihood <z, E_v> / sigma^2 of each target row
        (unit-norm rows, so the rest of log N(z; E_v, sigma^2 I) is the same for every v). sigma: (B,) or (B, Tn)."""
        z = at_least_fp32(z)
        sigma2 = at_least_fp32(sigma).reshape(z.shape[0], -1, 1) ** 2
        return z / sigma2, self.target_table

    def posterior_logits(self, prior: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """prior (B, Tn, V) + the evidence of z (B, Tn, e) at sigma, in fp32 (the sampler's steps after the
        block's first reuse one prior)."""
        u, E = self.evidence(z, sigma)
        return at_least_fp32(prior) + F.linear(u, E.to(u.dtype))

    def forward(
        self,
        clean_tokens: torch.Tensor,
        z: torch.Tensor,
        sigma: torch.Tensor,
        clean_pos: torch.Tensor | None = None,
        noisy_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        ce_chunk: int = 0,
        prior_ce: bool = False,
        with_evidence: bool = True,
        follows: torch.Tensor | None = None,
        evidence_at: torch.Tensor | None = None,
    ) -> tuple[None, torch.Tensor]:
        """As DenoiserBlock.forward (posterior readout), so both layouts train and sample through one interface.
        sigma: (B,), or (B, Tn) for the sigma-free block. The noisy target of position i is read at clean row
        i-1: `follows` (Tn,) indexes those rows (default: the last Tn), so noisy_pos is implied and not read.
        evidence_at (k,) (with targets and prior_ce; diffusion.noisy_fraction): the posterior's CE at those of
        the Tn positions only, 0 at the others; the prior's CE everywhere."""
        Tc, Tn = clean_tokens.shape[1], z.shape[1]
        if Tc < Tn:
            raise ValueError(f"{Tn} noisy positions follow {Tc} clean tokens")
        per_sequence = sigma if sigma.dim() == 1 else None
        h = self.hidden(clean_tokens, per_sequence, clean_pos, cache)
        h = h[:, Tc - Tn :] if follows is None else h[:, follows]
        evidence = self.evidence(z, sigma) if with_evidence else None
        rows = None
        if evidence_at is not None:  # (B, k) flattened, ascending: sequence b's positions at b * Tn + p
            rows = (torch.arange(z.shape[0], device=z.device)[:, None] * Tn + evidence_at.to(z.device)).reshape(-1)
        return None, self.lm_head(h, targets, ce_chunk, None, evidence, prior_ce, rows)


# model.block -> the class of that layout
BLOCKS = {"two_stream": DenoiserBlock, "stream": StreamBlock, "paper": PaperBlock}


def lm_loss(model: nn.Module, window: torch.Tensor, ce_chunk: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a causal LM (or its DeepSpeed engine) on (B, T+1) windows."""
    return model(window[:, :-1], targets=window[:, 1:], ce_chunk=ce_chunk).mean()


def denoiser_loss(
    block: nn.Module,
    window: torch.Tensor,
    target_embedding: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    weighting: str,
    sigma_data: float,
    ce_chunk: int = 0,
    prior_weight: float = 0.0,
    positions: torch.Tensor | None = None,
    prior_everywhere: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-block objective (paper Eq. 6 with a cross-entropy readout, docs/METHOD.md 4 and 5b).

    window: (B, T+1) ids; sigma: (B,) one noise level per sequence, or (B, T) one per target
    (diffusion.sigma_draw 'position'); noise: (B, T, e) ~ N(0, I).
    prior_weight > 0 (diffusion.prior_loss; posterior readout only) adds prior_weight * the mean CE of the
    block's prior logits, its context-only prediction, unweighted by sigma.
    positions (k,) ascending indices into the T targets (diffusion.noisy_fraction): only those are noised and
    denoised, the clean context stays whole; None = all T. prior_everywhere (the single-stream block, whose
    prior costs no extra layer rows): the prior term still covers all T targets, the posterior those k.
    Returns (loss = mean of w(sigma) * CE [+ prior term], per-sequence plain posterior CE (B,)), both fp32.
    """
    targets = window[:, 1:]
    extra = {"prior_ce": True} if prior_weight > 0 else {}  # (a family's own block need not know the keyword)
    everywhere = positions is not None and prior_everywhere and prior_weight > 0
    if everywhere:  # every target noised (cheap) and read by the prior; the evidence at `positions` only
        extra["evidence_at"] = positions
    elif positions is not None:  # noisy position p + 1 follows clean token p
        targets, noise = targets[:, positions], noise[:, positions]
        sigma = sigma if sigma.dim() == 1 else sigma[:, positions]
        extra.update(noisy_pos=positions + 1, follows=positions)
    z = target_embedding[targets] + sigma.reshape(sigma.shape[0], -1, 1) * noise
    _, token_ce = block(window[:, :-1], z, sigma, targets=targets, ce_chunk=ce_chunk, **extra)
    token_ce = at_least_fp32(token_ce)
    prior = 0.0
    if prior_weight > 0:
        token_ce, prior_ce = token_ce[..., 0], token_ce[..., 1]
        prior = prior_weight * prior_ce.mean()
    if everywhere:
        token_ce = token_ce[:, positions]
        sigma = sigma if sigma.dim() == 1 else sigma[:, positions]
    ce = token_ce.mean(dim=1)
    if weighting != "edm":
        return ce.mean() + prior, ce.detach()
    weight = edm_loss_weight(at_least_fp32(sigma), sigma_data)  # (B,), or (B, Tn) for sigma per position
    weighted = (weight * ce).mean() if weight.dim() == 1 else (weight * token_ce).mean()
    return weighted + prior, ce.detach()


class DiffusionBlocksLM(nn.Module):
    """The merged model: B denoiser blocks and the frozen target table, sampled as a chain of steps.

    `estimate` and `step` (diffusion.sample_estimate / sample_step, see dbscale/diffusion/sampler.py) may be
    changed on a loaded model. Every random draw of the chain for one position (its starting noise, the
    uniforms of sampled estimates, the noise of ancestral steps) comes from a generator seeded by (seed,
    position), so cached, uncached and teacher-forced runs of the chain draw the same numbers."""

    def __init__(self, cfg: Config, vocab_size: int, target_embedding: torch.Tensor, partition=None, layers=None):
        """partition: the run's `Partition` as its manifest records it (default: computed from cfg); layers: each
        block's layer count, as the family allocates them (default: diffusion.layers_per_block or an even split)."""
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        d = cfg.diffusion
        layers = default_layer_allocation(cfg) if layers is None else layers
        self.stacked = d.stack_context  # block b > 0 reads block b-1's residual stream
        table = target_embedding.float()
        self.blocks = nn.ModuleList(  # (a family's own make_block need not know `stacked`)
            self.make_block(cfg, vocab_size, n, table, stacked=True)
            if b > 0 and self.stacked
            else self.make_block(cfg, vocab_size, n, table)
            for b, n in enumerate(layers)
        )
        self.register_buffer("target_embedding", target_embedding.float(), persistent=True)
        self.partition = partition or Partition.from_config(d)
        self.set_sample_steps(None)
        self.estimate, self.step = d.sample_estimate, d.sample_step
        self.top_k = d.sample_top_k  # sigma-free chains: generation over the union of the blocks' top-k priors

    def set_sample_steps(self, num_steps: int | None) -> None:
        """Sampler steps per token: equal steps of the partition's schedule, each served by the block whose
        slice holds it (None: default_steps()). More steps than blocks give a block several calls per token,
        at that many times the generation cost."""
        d = self.cfg.diffusion
        n = self.default_steps() if num_steps is None else num_steps
        step_blocks = steps_to_blocks(n, d.num_blocks)  # refuses fewer steps than blocks; nothing is changed then
        boundaries = list(self.partition.boundaries)
        self.sigmas = step_sigmas(n, d.partition, d.P_mean, d.P_std, d.sigma_min, d.sigma_max, boundaries)
        self.step_blocks = step_blocks

    @staticmethod
    def make_block(cfg: Config, vocab_size: int, n_layers: int, table: torch.Tensor, stacked=False) -> nn.Module:
        return denoiser_block(cfg.model, vocab_size, n_layers, cfg.diffusion.sigma_data, table, stacked)

    @property
    def sigma_free(self) -> bool:
        """Every block's prior ignores sigma (the sigma-free single-stream block): one KV cache and one pass of
        its layers per block and token, and each sampler step adds its own evidence to its block's prior."""
        return all(getattr(block, "sigma_free", False) for block in self.blocks)

    def priors(self, context: list[torch.Tensor], clean_pos=None, cache=None, last: bool = False) -> list:
        """Sigma-free blocks: each block's prior logits for the clean tokens context[b] (B, Tc) (cache: one
        per block), (B, Tc, V), or only the last row's (B, 1, V). Stacked (diffusion.stack_context): block 0
        reads context[0] and every later block its predecessor's residual stream."""
        out, features = [], None
        for b, block in enumerate(self.blocks):
            block_cache = None if cache is None else cache[b]
            if self.stacked:
                features = block.residual(context[0] if features is None else features, clean_pos, block_cache)
                h = block.norm(features)
            else:
                h = block.hidden(context[b], None, clean_pos, block_cache)
            out.append(block.lm_head(h[:, -1:] if last else h))
        return out

    def default_steps(self) -> int:
        """Sampler steps per token: diffusion.sample_steps, or one per block (the paper's AR setting)."""
        return default_num_steps(self.cfg.diffusion.num_blocks, self.cfg.diffusion.sample_steps)

    @property
    def context_length(self) -> int:
        return self.cfg.model.seq_len

    def new_cache(self) -> list[KVCache]:
        if self.sigma_free:  # one per block: its layers never see sigma
            return [KVCache() for _ in self.blocks]
        return [KVCache() for _ in self.sigmas]  # one per step: each step runs at one fixed sigma

    def context_inputs(self, cache, new_tokens: torch.Tensor, clean_pos: torch.Tensor) -> list[torch.Tensor]:
        """What each block reads for the new clean tokens (their ids here; Huginn runs its preludes once)."""
        return [new_tokens] * len(self.blocks)

    def position_draws(self, seed: int, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chain's random numbers for one position: starting state (e,) ~ N(0, sigma_max^2), one uniform per
        step (K,) for sampled estimates, and ancestral noise (K, e) ~ N(0, I)."""
        e, K = self.target_embedding.shape[1], len(self.sigmas)
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + position)
        z0 = torch.randn(e, generator=g) * self.sigmas[0]
        return z0, torch.rand(K, generator=g), torch.randn(K, e, generator=g)

    def start_noise(self, seed: int, position: int) -> torch.Tensor:
        """The chain's starting state for one position, (1, 1, e)."""
        return self.position_draws(seed, position)[0].view(1, 1, -1)

    def rows_draws(self, seeds: list[int], position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """position_draws of one position for R sequences, sequence r with seeds[r]: (R, 1, e), (R, 1, K),
        (R, 1, K, e). A sequence draws the same numbers whatever batch it is generated in."""
        draws = [self.position_draws(seed, position) for seed in seeds]
        return tuple(torch.stack(x)[:, None] for x in zip(*draws, strict=True))

    def set_top_k(self, k: int | None) -> None:
        """Generate over the union of the blocks' k most likely prior tokens (None: over every token)."""
        if k is not None and (k < 1 or not self.sigma_free):
            raise ValueError(
                f"a top-k sampler needs k >= 1 (got {k}) and a chain of sigma-free blocks "
                f"(model.block stream, model.time_conditioning false; this chain's: {self.cfg.model.block}, "
                f"time_conditioning {self.cfg.model.time_conditioning})"
            )
        self.top_k = k

    def candidates(self, priors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tokens a top-k chain (self.top_k) samples among: the union of every block's k most likely prior
        tokens. priors: each block's (..., V) logits. Returns the ids (..., B k), sorted, and each block's prior
        logits over them in fp32, a repeated id at -inf (so it adds no probability). With k = V the chain over
        them is the exact one."""
        k = min(self.top_k, self.vocab_size)
        ids = torch.cat([p.topk(k, dim=-1).indices for p in priors], dim=-1).sort(dim=-1).values
        repeat = torch.zeros_like(ids, dtype=torch.bool)
        repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
        return ids, [p.float().gather(-1, ids).masked_fill(repeat, float("-inf")) for p in priors]

    def run_chain(
        self, call_block, z, u, noise, temperature: float, top_p: float, on_step=None, table=None
    ) -> torch.Tensor:
        """The chain from z at sigma_max. call_block(step, block, z, sigma) -> logits; u (..., K) and noise
        (..., K, e) are the per-position draws; on_step(step, block, sigma, logits) sees every step; table: the
        rows the logits index (default: the whole target table; per-row (..., C, e) for candidate tokens).
        Returns the last step's logits."""
        E, last = (self.target_embedding if table is None else table), len(self.sigmas) - 1

        def denoise(step: int, block: int, z: torch.Tensor, sigma: float):
            logits = call_block(step, block, z, sigma)
            if on_step is not None:
                on_step(step, block, sigma, logits)
            if step == last:  # the chain ends with these logits: the last estimate would go unused
                return None, logits
            return clean_estimate(logits, E, self.estimate, temperature, top_p, u[..., step]), logits

        logits, _ = sample_chain(denoise, z, self.sigmas, self.step_blocks, self.step, lambda k: noise[..., k, :])
        return logits.float()

    @torch.no_grad()
    def next_token_logits(
        self, cache: list[KVCache], new_tokens: torch.Tensor, seed=0, temperature: float = 0.0, top_p=1.0
    ) -> torch.Tensor:
        """Append new_tokens (R, n) to every step's context of R sequences; run the chain for the next position.

        seed: an int, or one per sequence (its chain's draws). temperature / top_p shape the chain's sampled
        estimates (estimate 'sample'). Returns the last step's logits (R, V)."""
        dev = new_tokens.device
        R, n = new_tokens.shape
        start = len(cache[0])
        seeds = [seed] * R if isinstance(seed, int) else list(seed)
        if len(seeds) != R:
            raise ValueError(f"{len(seeds)} seeds for {R} sequences")
        clean_pos = torch.arange(start, start + n, device=dev)
        noisy_pos = torch.tensor([start + n], device=dev)
        z0, u, noise = (x.to(dev) for x in self.rows_draws(seeds, start + n))
        context = self.context_inputs(cache, new_tokens, clean_pos)
        priors = self.priors(context, clean_pos, cache, last=True) if self.sigma_free else None
        if priors is not None and self.top_k:
            return self.top_k_chain(priors, z0, u, noise, temperature, top_p)[:, -1]

        def call_block(step: int, block: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((R,), sigma, device=dev)
            if priors is not None:
                return self.blocks[block].posterior_logits(priors[block], z, s)
            return self.blocks[block](context[block], z, s, clean_pos, noisy_pos, cache[step])[1]

        logits = self.run_chain(call_block, z0, u, noise, temperature, top_p)
        return logits[:, -1]

    def top_k_chain(self, priors, z, u, noise, temperature: float, top_p: float) -> torch.Tensor:
        """The sigma-free chain over candidates(priors) (diffusion.sample_top_k): each step's evidence and clean
        estimate cost C = B k rows of the table instead of V. Returns the last step's logits (..., V), -inf
        outside the candidates."""
        ids, cand_priors = self.candidates(priors)
        table = self.target_embedding[ids]  # (..., C, e)

        def call_block(step: int, block: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            u_z = at_least_fp32(z) / sigma**2
            return cand_priors[block] + (u_z.unsqueeze(-2) @ table.transpose(-1, -2).to(u_z.dtype)).squeeze(-2)

        logits = self.run_chain(call_block, z, u, noise, temperature, top_p, table=table)
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.scatter_reduce(-1, ids, logits, reduce="amax")

    def window_draws(self, B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """position_draws for noisy positions 1..T of B windows, window b with seed + b: (B, T, e), (B, T, K),
        (B, T, K, e)."""
        draws = [self.position_draws(seed + b, p) for b in range(B) for p in range(1, T + 1)]
        return tuple(torch.stack(x).view(B, T, *x[0].shape) for x in zip(*draws, strict=True))

    @torch.no_grad()
    def teacher_forced_logits(
        self,
        window: torch.Tensor,
        seed: int = 0,
        z: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        on_step=None,
    ) -> torch.Tensor:
        """Run the chain for every position of (B, T+1) windows at once, given the true context.

        Each noisy position only sees the clean context before it, so all T predictions are independent
        chains that share one batched call per step; window b draws as generation with seed + b would.
        z: optional starting noise (B, T, e), already scaled by sigma_max. Returns the final-step logits (B, T, V).
        """
        context = window[:, :-1]
        B, T = context.shape
        z0, u, noise = (x.to(window.device) for x in self.window_draws(B, T, seed))
        z = z0 if z is None else z.to(window.device)

        priors = self.priors([context] * len(self.blocks)) if self.sigma_free else None

        def call_block(step: int, block: int, z: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((B,), sigma, device=window.device)
            if priors is not None:
                return self.blocks[block].posterior_logits(priors[block], z, s)
            return self.blocks[block](context, z, s)[1]

        return self.run_chain(call_block, z, u, noise, temperature, top_p, on_step)
