"""The Llama family: a Llama-2 causal LM baseline; a block is L/B AdaLN layers denoising the next token's
embedding (dbscale/models/llama.py, docs/METHOD.md 7a)."""

from __future__ import annotations

import torch

from dbscale.families.base import Job
from dbscale.families.gaussian import GaussianFamily


class LlamaFamily(GaussianFamily):
    name = "llama"
    denoiser_blocks = True
    calibratable = True

    def validate(self, cfg, fail) -> None:
        super().validate(cfg, fail)
        check_layer_split(cfg, fail)
        check_block_layout(cfg.model, fail)

    def build(self, job: Job):
        from dbscale.models.llama import LlamaLM, block_reads_table, denoiser_block

        cfg = job.cfg
        if not job.is_block:
            return LlamaLM(cfg.model, job.vocab_size)
        table = job.extras["table"] if block_reads_table(cfg.model) else None
        n_layers = job.extras.get("layers") or self.layer_allocation(cfg)[job.block]
        stacked = cfg.diffusion.stack_context and job.block > 0  # reads block b-1's features
        return denoiser_block(cfg.model, job.vocab_size, n_layers, cfg.diffusion.sigma_data, table, stacked)

    def build_merged(self, cfg, vocab_size: int, manifest: dict, state: dict[str, torch.Tensor]) -> tuple:
        from dbscale.models.llama import DiffusionBlocksLM, LlamaLM

        if manifest["kind"] == "blocks":
            partition = self.partition(manifest["partition"])
            layers = self.layer_allocation(cfg)
            return DiffusionBlocksLM(cfg, vocab_size, state["target_embedding"], partition, layers), state
        return LlamaLM(cfg.model, vocab_size), state

    def dry_run_models(self, cfg, vocab_size: int):
        from dbscale.models.llama import LlamaLM, denoiser_block

        table = torch.empty(vocab_size, cfg.model.embed_dim)
        stack = cfg.diffusion.stack_context
        blocks = [
            denoiser_block(cfg.model, vocab_size, n, cfg.diffusion.sigma_data, table, stack and b > 0)
            for b, n in enumerate(self.layer_allocation(cfg))
        ]
        return LlamaLM(cfg.model, vocab_size), blocks


def check_block_layout(m, fail) -> None:
    """model.block against the settings that only one layout reads."""
    if m.block == "stream":
        if m.head != "learned":
            fail(
                "model.head",
                f"'{m.head}' is a two-stream block's setting; the single-stream block (model.block: stream) reads "
                "its prior through its own learned V x d head. Fix: remove model.head, or set model.block: two_stream.",
            )
    elif not m.time_conditioning:
        fail(
            "model.time_conditioning",
            f"false makes the single-stream block sigma-free; the '{m.block}' block is always noise-conditioned. "
            "Fix: set model.block: stream, or remove model.time_conditioning.",
        )


def check_layer_split(cfg, fail) -> None:
    """The L layers split among B blocks: equally, or by an explicit diffusion.layers_per_block."""
    m, d = cfg.model, cfg.diffusion
    if d.layers_per_block is None:
        if d.num_blocks > m.n_layers:
            divisors = [k for k in range(1, m.n_layers + 1) if m.n_layers % k == 0]
            fail(
                "diffusion.num_blocks",
                f"B={d.num_blocks} blocks need at least {d.num_blocks} layers (every block owns >= 1), but "
                f"model.n_layers={m.n_layers}. Fix: num_blocks one of {divisors}, or model.n_layers >= {d.num_blocks}.",
            )
        if m.n_layers % d.num_blocks:
            fail(
                "diffusion.num_blocks",
                f"B={d.num_blocks} does not divide model.n_layers={m.n_layers}. Fix: choose a divisor, or give "
                f"an explicit diffusion.layers_per_block list of {d.num_blocks} entries summing to {m.n_layers}.",
            )
        return
    alloc = d.layers_per_block
    if len(alloc) != d.num_blocks:
        fail("diffusion.layers_per_block", f"has {len(alloc)} entries but num_blocks={d.num_blocks}.")
    if sum(alloc) != m.n_layers or min(alloc) < 1:
        fail(
            "diffusion.layers_per_block",
            f"{alloc} sums to {sum(alloc)} but model.n_layers={m.n_layers}; every entry must be >= 1.",
        )
