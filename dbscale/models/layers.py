"""Transformer building blocks shared by every dbscale family.

Llama-2 style (RMSNorm, RoPE, SwiGLU, grouped-query attention) with optional DiT-style AdaLN noise
conditioning. Parameter names follow Hugging Face's Llama (`self_attn.q_proj`, `mlp.gate_proj`, ...).

Attention always takes explicit token positions, so two streams can share RoPE positions (the noisy and
clean copies of a sequence in the AR denoiser), and an optional KV cache that stores only the tokens the
caller marks as cacheable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dbscale.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (T,) -> two (T, head_dim) tensors (HF 'rotate_half' layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def stream_attention_mask(key_pos: torch.Tensor, key_clean: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend. The queries are the last `num_queries` keys.

    The rule (docs/METHOD.md 7a, BD3-LM with block size 1): a query sees every CLEAN key at an earlier
    position; a clean query also sees clean keys at its own position; every query sees itself; nothing
    sees a noisy key other than itself. With only clean tokens this is the ordinary causal mask.
    """
    offset = key_pos.numel() - num_queries
    q_pos, q_clean = key_pos[offset:], key_clean[offset:]
    earlier = key_pos[None, :] < q_pos[:, None]
    same_pos = key_pos[None, :] == q_pos[:, None]
    allowed = key_clean[None, :] & (earlier | (same_pos & q_clean[:, None]))
    itself = torch.arange(num_queries, device=key_pos.device)[:, None] + offset == torch.arange(
        key_pos.numel(), device=key_pos.device
    )
    return allowed | itself


@dataclass
class KVCache:
    """Per-layer keys/values of the cached (clean) tokens, plus their positions. One cache per stream.

    Keys and values live in buffers (B, H, capacity, head_dim) that grow by doubling, so appending a token
    writes it in place instead of copying the whole cache (amortised O(1) per token)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # cached tokens of each layer's buffer
    positions: torch.Tensor | None = None  # (T_cached,)
    # what a denoiser block derives from its one sigma (see DenoiserBlock.time_conditioning): (key, value)
    conditioning: tuple | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else int(self.positions.numel())

    def extend(self, i: int, k: torch.Tensor, v: torch.Tensor, num_cacheable: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values for a call that brings T new tokens k, v (B, H, T, hd): returns the cached
        ones followed by these (views of the buffer), and keeps the first num_cacheable of the new ones. The
        others (a chain's noisy query) sit past the cached length and are overwritten by the next call."""
        if i == len(self.keys):
            self.keys.append(k.new_empty(*k.shape[:2], 0, k.shape[3]))
            self.values.append(v.new_empty(*v.shape[:2], 0, v.shape[3]))
            self.lengths.append(0)
        n, T = self.lengths[i], k.shape[2]
        if n + T > self.keys[i].shape[2]:  # grow: one copy of the cache per doubling
            capacity = max(n + T, 2 * self.keys[i].shape[2])
            for buffers in (self.keys, self.values):
                grown = buffers[i].new_empty(*buffers[i].shape[:2], capacity, buffers[i].shape[3])
                grown[:, :, :n] = buffers[i][:, :, :n]
                buffers[i] = grown
        self.keys[i][:, :, n : n + T] = k
        self.values[i][:, :, n : n + T] = v
        self.lengths[i] = n + num_cacheable
        return self.keys[i][:, :, : n + T], self.values[i][:, :, : n + T]


class Attention(nn.Module):
    """Grouped-query attention with RoPE. Without an explicit mask it is causal, or bidirectional when built
    with causal=False (the masked family: every position sees the whole partially masked sequence)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        num_cacheable: int = 0,
    ) -> torch.Tensor:
        """x: (B, T, d). mask: (T, T_cached + T) bool, or None for plain causal (or bidirectional) attention.
        The first `num_cacheable` new tokens are appended to `cache` after use."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(layer_index, k, v, num_cacheable)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TimestepEmbedder(nn.Module):
    """c_noise -> sinusoidal features -> Linear -> SiLU -> Linear (DiT, docs/METHOD.md section 5)."""

    # c_noise = ln(sigma)/4 spans about [-1.6, 1.1]; scaled like DiT's t in [0, 1000] so the sinusoids
    # resolve it at many frequencies.
    scale = 1000.0

    def __init__(self, d: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise: (B,) -> (B, d)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device).float() / half)
        args = c_noise.float()[:, None] * self.scale * freqs[None, :]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TransformerLayer(nn.Module):
    """Pre-norm Llama layer; with `adaln=True`, DiT's adaLN-Zero modulation from a conditioning vector;
    with `sandwich=True`, Huginn's sandwich norm (an extra RMSNorm on the attention and MLP outputs before
    they join the residual stream, which keeps a state iterated many times bounded)."""

    def __init__(self, cfg: ModelConfig, adaln: bool = False, causal: bool = True, sandwich: bool = False):
        super().__init__()
        d = cfg.d_model
        self.input_layernorm = RMSNorm(d, cfg.norm_eps)
        self.self_attn = Attention(cfg, causal)
        self.post_attention_layernorm = RMSNorm(d, cfg.norm_eps)
        self.mlp = SwiGLU(d, cfg.ffn_dim)
        self.adaLN_modulation = nn.Linear(d, 6 * d) if adaln else None
        if sandwich:
            self.attn_out_norm = RMSNorm(d, cfg.norm_eps)
            self.mlp_out_norm = RMSNorm(d, cfg.norm_eps)
        else:
            self.attn_out_norm = self.mlp_out_norm = None

    def _out(self, norm, h):
        return h if norm is None else norm(h)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaLN: (shift, scale, gate) for attention, then for the MLP, six (B, 1, d) tensors from cond (B, d)."""
        return self.adaLN_modulation(F.silu(cond))[:, None, :].chunk(6, dim=-1)

    def forward(self, x, cos, sin, mask, cond=None, cache=None, layer_index=0, num_cacheable=0, mods=None):
        """mods: this layer's modulation(cond), when the caller already has it (cond is then not read)."""
        if self.adaLN_modulation is None:
            h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer_index, num_cacheable)
            x = x + self._out(self.attn_out_norm, h)
            return x + self._out(self.mlp_out_norm, self.mlp(self.post_attention_layernorm(x)))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond) if mods is None else mods
        h = modulate(self.input_layernorm(x), shift_a, scale_a)
        h = self.self_attn(h, cos, sin, mask, cache, layer_index, num_cacheable)
        x = x + gate_a * self._out(self.attn_out_norm, h)
        h = modulate(self.post_attention_layernorm(x), shift_m, scale_m)
        return x + gate_m * self._out(self.mlp_out_norm, self.mlp(h))


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to fp32 (softmax, the EDM readout); fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Head(nn.Module):
    """Readout h -> logits over the vocabulary, or straight to per-token cross-entropy in chunks.

    'learned': a (V, dim) weight (a bias-free Linear; the name `lm_head.weight` matches Hugging Face).
    'target': logits = scale * h @ E^T with the run's frozen target table E, passed in by the caller; only the
    scalar scale is trained (zero-initialised, so a fresh block predicts uniformly, like a zero head).
    `evidence` = (u, E) adds u @ E^T to the logits (the posterior readout's Gaussian log-likelihood, u = z/sigma^2),
    in fp32 and chunk by chunk like the logits themselves.
    With `targets`, returns CE per token; with `prior_ce` as well (only with `evidence`), a trailing axis of 2:
    [..., 0] the CE of the full logits, [..., 1] the CE of the logits without the evidence (the prior alone).
    `chunk` > 0 builds the logits of `chunk` tokens at a time under
    activation checkpointing, so neither forward nor backward ever holds more than one chunk of logits.
    The loss is computed inside this module's forward, so ZeRO-3 has gathered the weight when it is used.
    """

    def __init__(self, dim: int, vocab_size: int, kind: str = "learned"):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.weight = nn.Parameter(torch.empty(vocab_size, dim))
            # As nn.Linear draws it: keeps the random stream, so earlier runs' initialisations are reproduced.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        elif kind == "target":
            self.logit_scale = nn.Parameter(torch.zeros(1))  # shape (1,): DeepSpeed cannot broadcast 0-d parameters
        else:
            raise ValueError(f"unknown head '{kind}'")

    def logits(self, h: torch.Tensor, table: torch.Tensor | None = None, evidence: tuple | None = None) -> torch.Tensor:
        if self.kind == "target" and evidence is not None and evidence[1] is table:
            # Head and evidence read the same table: scale * h @ E^T + u @ E^T = (scale * h + u) @ E^T, one
            # vocabulary-sized product instead of two (in fp32, as the evidence needs).
            u = at_least_fp32(evidence[0])
            return F.linear(at_least_fp32(h) * self.logit_scale.to(u.dtype) + u, table.to(u.dtype))
        if self.kind == "learned":
            out = F.linear(h, self.weight)
        else:
            out = F.linear(h * self.logit_scale.to(h.dtype), table.to(h.dtype))  # scaling h saves no V-sized tensor
        if evidence is None:
            return out
        u, E = evidence
        u = at_least_fp32(u)  # the evidence reaches 1/sigma_min^2: never in half precision
        return at_least_fp32(out) + F.linear(u, E.to(u.dtype))

    def _chunk_ce(self, h, targets, table, u=None, E=None, prior_ce: bool = False, rows=None) -> torch.Tensor:
        if not prior_ce:
            logits = self.logits(h, table, None if u is None else (u, E))
            return F.cross_entropy(at_least_fp32(logits), targets, reduction="none")
        prior = at_least_fp32(self.logits(h, table))
        prior_loss = F.cross_entropy(prior, targets, reduction="none")
        u = at_least_fp32(u)
        if rows is None:
            posterior = prior + F.linear(u, E.to(u.dtype))
            return torch.stack([F.cross_entropy(posterior, targets, reduction="none"), prior_loss], dim=-1)
        # the evidence (and the posterior's CE) only at the rows listed; 0 elsewhere
        index = rows
        posterior = prior[index] + F.linear(u[index], E.to(u.dtype))
        post_loss = torch.zeros_like(prior_loss).index_add(
            0, index, F.cross_entropy(posterior, targets[index], reduction="none")
        )
        return torch.stack([post_loss, prior_loss], dim=-1)

    def forward(
        self,
        h: torch.Tensor,
        targets: torch.Tensor | None = None,
        chunk: int = 0,
        table: torch.Tensor | None = None,
        evidence: tuple[torch.Tensor, torch.Tensor] | None = None,
        prior_ce: bool = False,
        evidence_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """evidence_rows (with prior_ce): ascending indices into the flattened targets; the posterior's CE only
        at those rows (0 elsewhere), the prior's everywhere: the evidence product runs over those rows alone."""
        if prior_ce and (targets is None or evidence is None):
            raise ValueError("prior_ce needs targets and evidence (the prior is the logits without the evidence)")
        if targets is None:
            return self.logits(h, table, evidence)
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        u, E = (None, None) if evidence is None else (evidence[0].reshape(-1, evidence[0].shape[-1]), evidence[1])
        rows = evidence_rows

        def chunk_rows(i: int):  # the listed rows inside chunk [i, i + chunk), relative to it
            return None if rows is None else rows[(rows >= i) & (rows < i + chunk)] - i

        if chunk <= 0 or chunk >= flat_t.numel() or not torch.is_grad_enabled():
            ce = self._chunk_ce(flat_h, flat_t, table, u, E, prior_ce, rows)
        else:
            ce = torch.cat(
                [
                    checkpoint(
                        self._chunk_ce,
                        flat_h[i : i + chunk],
                        flat_t[i : i + chunk],
                        table,
                        None if u is None else u[i : i + chunk],
                        E,
                        prior_ce,
                        chunk_rows(i),
                        use_reentrant=False,
                    )
                    for i in range(0, flat_t.numel(), chunk)
                ]
            )
        return ce.view(*targets.shape, 2) if prior_ce else ce.view(targets.shape)


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cond: torch.Tensor | None = None,
    cache: KVCache | None = None,
    num_cacheable: int = 0,
    activation_checkpointing: bool = False,
    mods: list | None = None,
) -> torch.Tensor:
    """Apply a stack of layers; recompute activations in backward when asked (training only).
    mods: every layer's adaLN modulation, precomputed (TransformerLayer.modulation); otherwise made from cond."""
    for i, layer in enumerate(layers):
        layer_mods = None if mods is None else mods[i]
        if activation_checkpointing and torch.is_grad_enabled() and cache is None:
            x = checkpoint(layer, x, cos, sin, mask, cond, None, i, 0, layer_mods, use_reentrant=False)
        else:
            x = layer(x, cos, sin, mask, cond, cache, i, num_cacheable, layer_mods)
    return x


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases. Zero-inits are applied after."""
    for m in module.modules():
        if isinstance(m, nn.Linear) or (isinstance(m, Head) and m.kind == "learned"):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)


def zero_init_adaln(layers: nn.ModuleList, gate: float = 0.0) -> None:
    """adaLN-Zero (gate 0): every gate, shift and scale starts at 0, so each conditioned layer starts as the
    identity. gate 1: the gates start open, so each layer starts as the plain pre-norm layer."""
    for layer in layers:
        if layer.adaLN_modulation is not None:
            nn.init.zeros_(layer.adaLN_modulation.weight)
            nn.init.zeros_(layer.adaLN_modulation.bias)
            if gate:
                d = layer.adaLN_modulation.out_features // 6  # (shift, scale, gate) for attention, then MLP
                with torch.no_grad():
                    layer.adaLN_modulation.bias[2 * d : 3 * d].fill_(gate)
                    layer.adaLN_modulation.bias[5 * d :].fill_(gate)
