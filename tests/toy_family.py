"""A fourth model family, registered from outside dbscale: the walk-through of docs/adding_a_family.md.

'bigram' is a Gaussian family whose baseline is a bigram LM (logits = a table row of the previous token) and
whose block is a bigram denoiser: the same table as the context's prior, plus the exact Gaussian evidence of
the noisy target (the posterior readout of docs/METHOD.md 5b). Everything else (partition, noise draw, loss,
chain sampler, merge, generation) comes from dbscale. Imported by every dbscale process that has
DBSCALE_FAMILIES=toy_family and this folder on PYTHONPATH.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dbscale import families
from dbscale.families.gaussian import GaussianFamily
from dbscale.models.layers import KVCache
from dbscale.models.llama import DiffusionBlocksLM


@dataclass
class BigramConfig:
    """The family's own config section, `model.bigram:` (read as cfg.model.family_config)."""

    prior_init_std: float = field(default=0.0, metadata={"help": "Std of the bigram table's init (0: zeros)."})


def init_prior(table: nn.Embedding, std: float) -> None:
    nn.init.normal_(table.weight, std=std) if std > 0 else nn.init.zeros_(table.weight)


class BigramLM(nn.Module):
    """The baseline: p(x_i | x_<i) = softmax(W[x_{i-1}])."""

    def __init__(self, vocab_size: int, seq_len: int, init_std: float = 0.0):
        super().__init__()
        self.prior = nn.Embedding(vocab_size, vocab_size)
        self.context_length = seq_len
        init_prior(self.prior, init_std)

    def forward(self, tokens, positions=None, cache=None, targets=None, ce_chunk: int = 0):
        logits = self.prior(tokens)
        if cache is not None:
            n = tokens.shape[1]
            start = len(cache)
            new = torch.arange(start, start + n)
            cache.positions = new if cache.positions is None else torch.cat([cache.positions, new])
        if targets is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.no_grad()
    def next_token_logits(self, cache, new_tokens, seed: int = 0, **sampling):
        return self(new_tokens, cache=cache)[:, -1].float()


class BigramDenoiser(nn.Module):
    """A block: logits = W[x_{i-1}] + <z, E_v> / sigma^2 (noisy position i follows the last clean token)."""

    def __init__(self, vocab_size: int, table: torch.Tensor, init_std: float = 0.0):
        super().__init__()
        self.prior = nn.Embedding(vocab_size, vocab_size)
        init_prior(self.prior, init_std)
        self.register_buffer("target_table", table, persistent=False)

    def forward(self, clean, z, sigma, clean_pos=None, noisy_pos=None, cache=None, targets=None, ce_chunk: int = 0):
        if cache is not None and clean.shape[1]:
            pos = clean_pos if clean_pos is not None else torch.arange(clean.shape[1])
            cache.positions = pos if cache.positions is None else torch.cat([cache.positions, pos])
        prev = clean[:, clean.shape[1] - z.shape[1] :]
        logits = self.prior(prev) + z.float() @ self.target_table.T / sigma.float().view(-1, 1, 1) ** 2
        if targets is None:
            return None, logits
        return None, F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


class BigramChain(DiffusionBlocksLM):
    """The merged model: dbscale's chain sampler over bigram blocks."""

    @staticmethod
    def make_block(cfg, vocab_size: int, n_layers: int, table: torch.Tensor) -> nn.Module:
        return BigramDenoiser(vocab_size, table)


class BigramFamily(GaussianFamily):
    name = "bigram"
    config_section = BigramConfig  # model.bigram: its own fields, validated here

    def validate(self, cfg, fail) -> None:
        super().validate(cfg, fail)
        if cfg.model.family_config.prior_init_std < 0:
            fail("model.bigram.prior_init_std", f"must be >= 0, got {cfg.model.family_config.prior_init_std}.")

    def build(self, job):
        std = job.cfg.model.family_config.prior_init_std
        if not job.is_block:
            return BigramLM(job.vocab_size, job.cfg.model.seq_len, std)
        return BigramDenoiser(job.vocab_size, job.extras["table"], std)

    def build_merged(self, cfg, vocab_size, manifest, state):
        if manifest["kind"] == "blocks":
            partition = self.partition(manifest["partition"])
            return BigramChain(cfg, vocab_size, state["target_embedding"], partition), state
        return BigramLM(vocab_size, cfg.model.seq_len), state

    def dry_run_models(self, cfg, vocab_size):
        table = torch.empty(vocab_size, cfg.model.embed_dim)
        blocks = [BigramDenoiser(vocab_size, table) for _ in self.layer_allocation(cfg)]
        return BigramLM(vocab_size, cfg.model.seq_len), blocks


families.register(BigramFamily())
