"""The Huginn family: a recurrent-depth baseline trained with truncated BPTT; a block is a sigma-conditioned
core trained with one pass per step (dbscale/models/huginn.py, docs/METHOD.md 7c)."""

from __future__ import annotations

import numpy as np
import torch

from dbscale.families.base import Job, StepInfo, derive_seed
from dbscale.families.gaussian import GaussianFamily
from dbscale.families.llama import check_block_layout
from dbscale.models.huginn import HuginnConfig


class HuginnFamily(GaussianFamily):
    name = "huginn"
    denoiser_blocks = True
    config_section = HuginnConfig  # model.huginn: prelude, core, coda and the baseline's recurrence

    def validate(self, cfg, fail) -> None:
        super().validate(cfg, fail)
        m, d = cfg.model, cfg.diffusion
        check_block_layout(m, fail)
        h = m.family_config
        parts = (h.prelude_layers, h.core_layers, h.coda_layers)
        if min(parts) < 1 or sum(parts) != m.n_layers:
            fail(
                "model.n_layers",
                f"a Huginn model is prelude + core + coda = {parts[0]} + {parts[1]} + {parts[2]} layers, but "
                f"n_layers={m.n_layers}. Fix: set model.n_layers: {sum(parts)} (every part needs >= 1 layer).",
            )
        for key in ("mean_recurrence", "bptt_steps"):
            if getattr(h, key) < 1:
                fail(f"model.huginn.{key}", f"must be >= 1, got {getattr(h, key)}.")
        if h.eval_recurrence is not None and h.eval_recurrence < 1:
            fail("model.huginn.eval_recurrence", f"must be >= 1 or null, got {h.eval_recurrence}.")
        if h.recurrence_std < 0 or h.state_init_std <= 0:
            fail("model.huginn.recurrence_std", "recurrence_std must be >= 0 and state_init_std > 0.")
        if d.stack_context:
            fail("diffusion.stack_context", "stacks the Llama family's sigma-free blocks only; remove it.")
        if d.layers_per_block is not None:
            fail("diffusion.layers_per_block", "a Huginn block is a whole prelude + core + coda; remove it.")

    def layer_allocation(self, cfg) -> list[int]:
        return [cfg.model.n_layers] * cfg.diffusion.num_blocks  # every block is a whole prelude + core + coda

    def build(self, job: Job):
        from dbscale.models.huginn import HuginnDenoiser, HuginnLM
        from dbscale.models.llama import block_reads_table

        cfg = job.cfg
        if not job.is_block:
            return HuginnLM(cfg.model, job.vocab_size)
        table = job.extras["table"] if block_reads_table(cfg.model) else None
        return HuginnDenoiser(cfg.model, job.vocab_size, cfg.diffusion.sigma_data, table)

    def loss(self, job: Job, model, window: torch.Tensor, draw: tuple, step: StepInfo) -> tuple:
        if not job.is_block:
            from dbscale.models.huginn import sample_recurrence

            module = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
            if module.training:  # r and the initial state: functions of (seed, micro-batch), the same on every rank
                h = job.cfg.model.family_config
                r = sample_recurrence(
                    np.random.default_rng(derive_seed(step.seed, step.index, 4)), h.mean_recurrence, h.recurrence_std
                )
                module.recurrence = (r, h.bptt_steps, derive_seed(step.seed, step.index, step.rank, 5))
        return super().loss(job, model, window, draw, step)

    def build_merged(self, cfg, vocab_size: int, manifest: dict, state: dict[str, torch.Tensor]) -> tuple:
        from dbscale.models.huginn import HuginnDiffusionLM, HuginnLM

        if manifest["kind"] == "blocks":
            partition = self.partition(manifest["partition"])
            return HuginnDiffusionLM(cfg, vocab_size, state["target_embedding"], partition), state
        return HuginnLM(cfg.model, vocab_size), state

    def dry_run_models(self, cfg, vocab_size: int):
        from dbscale.models.huginn import HuginnDenoiser, HuginnLM

        table = torch.empty(vocab_size, cfg.model.embed_dim)
        blocks = [
            HuginnDenoiser(cfg.model, vocab_size, cfg.diffusion.sigma_data, table) for _ in self.layer_allocation(cfg)
        ]
        return HuginnLM(cfg.model, vocab_size), blocks
