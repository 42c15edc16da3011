"""What the Gaussian families (llama, huginn) share: the sigma partition, the noise draw and the block loss.

A block job draws one sigma per sequence from the log-normal truncated to its widened slice and one
z_sigma = E[y] + sigma * eps per target (docs/METHOD.md 2-4); its loss is denoiser_loss (the per-block
objective, paper Eq. 6 with a cross-entropy readout). The baseline is a plain causal LM loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dbscale.diffusion.noise import sample_truncated_lognormal
from dbscale.diffusion.partition import Partition
from dbscale.families.base import Family, Job, StepInfo, derive_seed


class GaussianFamily(Family):
    space = "sigma"
    target_table = True
    # Whether the blocks are dbscale's AR blocks (or wrap them): then model.block decides whether they
    # have a separate prior that diffusion.prior_loss trains, and denoiser_loss asks them for its CE. A family
    # with blocks of its own keeps False (no prior term; its blocks' forward need not know `prior_ce`).
    denoiser_blocks = False

    def validate(self, cfg, fail) -> None:
        d = cfg.diffusion
        if d.t_boundaries is not None:
            fail("diffusion.t_boundaries", "is read by the masked family only; remove it.")
        m = cfg.model
        if d.sigma_draw == "position" and not (m.block == "stream" and not m.time_conditioning):
            fail(
                "diffusion.sigma_draw",
                "'position' needs the sigma-free block (model.block: stream, model.time_conditioning: false), whose "
                "layers never read sigma; a noise-conditioned block sees one sigma per sequence. Fix: sigma_draw: "
                "sequence, or switch to the sigma-free block.",
            )
        if d.sample_top_k is not None and not (m.block == "stream" and not m.time_conditioning):
            fail(
                "diffusion.sample_top_k",
                "restricts the sampler to the blocks' top-k prior tokens, which needs the sigma-free block "
                "(model.block: stream, model.time_conditioning: false), whose priors are known before the chain "
                "runs. Fix: remove it, or switch to the sigma-free block.",
            )
        if d.noisy_fraction != 1 and not self.denoiser_blocks:
            fail("diffusion.noisy_fraction", f"the '{self.name}' family's blocks train on every position; remove it.")
        if d.partition == "calibrated" and d.boundaries is None and not self.calibratable:
            fail(
                "diffusion.boundaries",
                f"the '{self.name}' family cannot measure its partition at prepare time. Fix: give the "
                "calibrated boundaries, or choose partition 'equiprobable' or 'uniform'.",
            )

    def partition_record(self, cfg) -> dict:
        d = cfg.diffusion
        if d.partition == "calibrated" and d.boundaries is None:
            return {"kind": "calibrated", "pending": True, "method": d.calibration}
        p = Partition.from_config(d)
        return {
            "kind": d.partition,
            "gamma": d.gamma,
            "sigma_boundaries": list(p.boundaries),
            "block_intervals": [list(iv) for iv in p.intervals],
            "train_intervals": [list(iv) for iv in p.train_intervals],
        }

    def partition(self, record: dict) -> Partition:
        return Partition.from_record(record)

    def job(self, run, block: int | None) -> Job:
        job = super().job(run, block)
        if block is not None:
            job.extras["table"] = run.load_target_embedding()  # the noisy targets (and head/context/readout)
        return job

    def draw(self, job: Job, window: torch.Tensor, noise_seed: int) -> tuple:
        if not job.is_block:
            return ()
        d = job.cfg.diffusion
        g = torch.Generator().manual_seed(noise_seed)
        shape = (len(window), window.shape[1] - 1, job.cfg.model.embed_dim)
        draws = shape[0] * shape[1] if d.sigma_draw == "position" else shape[0]  # (B, T) or (B,)
        sigma = sample_truncated_lognormal(draws, *job.interval, d.P_mean, d.P_std, generator=g).view(shape[0], -1)
        sigma = sigma.squeeze(1) if d.sigma_draw == "sequence" else sigma
        g_dev = torch.Generator(device=window.device).manual_seed(noise_seed)  # noise is drawn where it is used
        noise = torch.randn(shape, generator=g_dev, device=window.device)
        if d.noisy_fraction == 1:
            return sigma.float().to(window.device), noise
        # A subset of the positions for the noisy stream (diffusion.noisy_fraction), from a generator of its own
        # so that sigma and the noise are the same draws as at fraction 1.
        T = shape[1]
        keep = max(1, round(d.noisy_fraction * T))
        g_pos = torch.Generator().manual_seed(derive_seed(noise_seed, 6))
        positions = torch.randperm(T, generator=g_pos)[:keep].sort().values
        return sigma.float().to(window.device), noise, positions.to(window.device)

    def loss(self, job: Job, model, window: torch.Tensor, draw: tuple, step: StepInfo) -> tuple:
        from dbscale.models.llama import block_has_prior, denoiser_loss, lm_loss

        ce_chunk = job.cfg.train.ce_chunk
        if not job.is_block:
            loss = lm_loss(model, window, ce_chunk)
            return loss, loss.detach().expand(window.shape[0])
        sigma, noise, *subset = draw
        # validation (step.index -1) scores every position; a training micro-batch its drawn subset, if any
        positions = subset[0] if subset and step.index >= 0 else None
        d = job.cfg.diffusion
        table = job.extras["table"]
        if table.device != window.device:
            table = job.extras["table"] = table.to(window.device)
        prior = d.prior_loss if self.denoiser_blocks and block_has_prior(job.cfg.model) else 0.0
        everywhere = job.cfg.model.block == "stream"  # its prior costs no extra layer rows: train it everywhere
        return denoiser_loss(
            model, window, table, sigma, noise, d.loss_weighting, d.sigma_data, ce_chunk, prior, positions, everywhere
        )

    def partition_figure(self, run, path, plt) -> None:
        d = run.config.diffusion
        part = run.manifest["partition"]
        sigma = np.logspace(math.log10(d.sigma_min), math.log10(d.sigma_max), 600)
        density = np.exp(-((np.log(sigma) - d.P_mean) ** 2) / (2 * d.P_std**2)) / (d.P_std * math.sqrt(2 * math.pi))
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.plot(sigma, density, color="black", lw=1.5, label=f"ln sigma ~ N({d.P_mean}, {d.P_std}^2)")
        from dbscale.plotting import shade_intervals

        shade_intervals(ax, sigma, density, part["block_intervals"], part["train_intervals"])
        ax.set_xscale("log")
        ax.set_xlabel("sigma (log scale)")
        ax.set_ylabel("density of ln sigma")
        ax.set_title(
            f"{part['kind']} partition, B={len(part['block_intervals'])}, gamma={part['gamma']} (hatched: overlap)"
        )
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
