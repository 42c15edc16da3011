"""The masked family: MD4/MDLM masked diffusion; a block is a complete bidirectional denoiser of L/B layers
for one slice of the masking time t, the baseline the same denoiser with L layers over all of [0, 1]
(dbscale/models/masked.py, dbscale/diffusion/masking.py, docs/METHOD.md 7b)."""

from __future__ import annotations

import numpy as np
import torch

from dbscale.diffusion.masking import TPartition, schedule_from_config, stratified_times
from dbscale.families.base import Family, Job, StepInfo
from dbscale.families.llama import check_layer_split


class MaskedFamily(Family):
    name = "masked"
    space = "t"
    target_table = False
    generates = "sequence"

    def validate(self, cfg, fail) -> None:
        m, d = cfg.model, cfg.diffusion
        check_layer_split(cfg, fail)
        if d.noisy_fraction != 1:
            fail("diffusion.noisy_fraction", "is read by the AR families (llama, huginn) only; remove it.")
        if d.stack_context:
            fail("diffusion.stack_context", "stacks the Llama family's sigma-free blocks only; remove it.")
        if not 0 < d.t_min < 1:
            fail("diffusion.t_min", f"must be in (0, 1), got {d.t_min}.")
        if not 0 < d.mask_eps < 1:
            fail("diffusion.mask_eps", f"must be in (0, 1), got {d.mask_eps}.")
        if "target" in (m.head, m.context_embedding):
            fail("model.head", "the masked family has no target table; use head and context_embedding 'learned'.")
        tb = d.t_boundaries
        if tb is not None and (
            len(tb) != d.num_blocks + 1 or tb[0] != 0 or tb[-1] != 1 or any(a >= b for a, b in zip(tb, tb[1:]))
        ):
            fail(
                "diffusion.t_boundaries",
                f"needs num_blocks+1={d.num_blocks + 1} strictly ascending times from 0 to 1 (every block a "
                f"non-empty slice), got {tb}. Fix: correct the list, or null for equal decrements of alpha.",
            )
        if d.partition != "equiprobable" or d.boundaries is not None:
            fail(
                "diffusion.partition",
                "the masked family splits t into equal decrements of alpha (diffusion.mask_schedule); the sigma "
                "partitions do not apply. Fix: leave diffusion.partition at its default and boundaries unset.",
            )

    def partition_record(self, cfg) -> dict:
        d = cfg.diffusion
        p = TPartition.from_config(d)
        return {
            "kind": "equal_alpha",
            "space": "t",
            "schedule": d.mask_schedule,
            "gamma": d.gamma,
            "t_boundaries": list(p.boundaries),
            "block_intervals": [list(iv) for iv in p.intervals],
            "train_intervals": [list(iv) for iv in p.train_intervals],
        }

    def partition(self, record: dict) -> TPartition:
        return TPartition.from_record(record)

    def window_length(self, cfg) -> int:
        return cfg.model.seq_len  # a whole sequence is denoised, nothing is predicted beyond it

    def job(self, run, block: int | None) -> Job:
        job = super().job(run, block)
        if block is None:
            job.interval = (0.0, 1.0)  # the baseline is the same denoiser over all of t
        job.extras["schedule"] = schedule_from_config(run.config.diffusion)
        return job

    def build(self, job: Job):
        from dbscale.models.masked import MaskedDenoiser

        n_layers = job.cfg.model.n_layers if job.block is None else self.layer_allocation(job.cfg)[job.block]
        return MaskedDenoiser(job.cfg.model, job.vocab_size, n_layers)

    def draw(self, job: Job, window: torch.Tensor, noise_seed: int) -> tuple:
        """t stratified across the micro-batch within the slice; u decides which tokens are masked."""
        g = torch.Generator().manual_seed(noise_seed)
        times = stratified_times(len(window), *job.interval, generator=g)
        g_dev = torch.Generator(device=window.device).manual_seed(noise_seed)
        u = torch.rand(window.shape, generator=g_dev, device=window.device)
        return times.to(window.device), u

    def loss(self, job: Job, model, window: torch.Tensor, draw: tuple, step: StepInfo) -> tuple:
        from dbscale.models.masked import masked_elbo_terms

        t, u = draw
        lo, hi = job.interval
        cfg = job.cfg
        nelbo, masked_ce = masked_elbo_terms(
            model,
            window,
            t,
            u,
            job.extras["schedule"],
            hi - lo,
            cfg.diffusion.t_min,
            job.vocab_size,
            cfg.train.ce_chunk,
        )
        return nelbo.mean(), masked_ce

    def build_merged(self, cfg, vocab_size: int, manifest: dict, state: dict[str, torch.Tensor]) -> tuple:
        from dbscale.models.masked import MaskedDiffusionLM

        e2e = manifest["kind"] == "e2e"
        partition = None if e2e else self.partition(manifest["partition"])
        model = MaskedDiffusionLM(cfg, vocab_size, e2e=e2e, partition=partition, layers=self.layer_allocation(cfg))
        if e2e:  # the baseline's keys are one denoiser's: it is block 0 of the merged model
            state = {f"blocks.0.{k}": v for k, v in state.items()}
        return model, state

    def dry_run_models(self, cfg, vocab_size: int):
        from dbscale.models.masked import MaskedDenoiser

        blocks = [MaskedDenoiser(cfg.model, vocab_size, n) for n in self.layer_allocation(cfg)]
        return MaskedDenoiser(cfg.model, vocab_size, cfg.model.n_layers), blocks

    def partition_figure(self, run, path, plt) -> None:
        """alpha(t) with each block's t-slice shaded (equal decrements of alpha), overlap hatched."""
        from dbscale.plotting import shade_intervals

        part = run.manifest["partition"]
        schedule = schedule_from_config(run.config.diffusion)
        t = np.linspace(0, 1, 600)
        alpha = np.array([schedule.alpha(float(x)) for x in t])
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.plot(t, alpha, color="black", lw=1.5, label=f"alpha(t), {part['schedule']} schedule")
        label = "block {b}: t in [{lo:.3g}, {hi:.3g}]"
        shade_intervals(ax, t, alpha, part["block_intervals"], part["train_intervals"], label)
        ax.set_xlabel("masking time t")
        ax.set_ylabel("alpha(t) = P(unmasked)")
        ax.set_title(
            f"equal-alpha partition, B={len(part['block_intervals'])}, gamma={part['gamma']} (hatched: overlap)"
        )
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
