"""The calibration run: how hard denoising is at each sigma, measured on a prepared run (dbscale/diffusion/
calibrate.py turns the curve into boundaries).

One block of the run's family is trained over the whole range [sigma_min, sigma_max] (log-uniform sigma, plain
cross-entropy, a short linear warm-up then constant LR) through the same step as every job (`train_step`), and
its validation cross-entropy is measured on a log-spaced grid of sigmas with one fixed noise draw each.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from dbscale import families
from dbscale.diffusion.noise import lognormal_cdf
from dbscale.errors import RunError
from dbscale.families import StepInfo
from dbscale.train.trainer import PlainEngine, train_step


def measure_loss_curve(
    run, steps: int, layers: int, grid_points: int = 25, val_windows: int = 32, seed: int = 0, log=print
) -> dict:
    """Train one `layers`-layer block over [sigma_min, sigma_max] on the run's data; return CE(sigma)."""
    family = families.get(run.config.model.family)
    if not family.calibratable:
        raise RunError(
            f"{run.root}: the '{family.name}' family cannot calibrate its partition. Fix: set "
            "diffusion.partition: equiprobable (or uniform, or explicit calibrated boundaries)."
        )
    d, t = run.config.diffusion, run.config.train
    cfg = dataclasses.replace(run.config, diffusion=dataclasses.replace(d, loss_weighting="none"))
    job = families.Job(cfg, run.vocab_size, 0, (d.sigma_min, d.sigma_max), {"layers": layers})
    job.extras["table"] = E = run.load_target_embedding()
    torch.manual_seed(seed)
    model = family.build(job)
    warmup = max(1, min(t.warmup_steps, steps // 10))
    engine = PlainEngine(model, t, schedule=lambda i: min(1.0, (i + 1) / warmup))
    train, val = run.shards("train"), run.shards("val")
    length = family.window_length(cfg)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(d.sigma_min), math.log(d.sigma_max)
    t0 = time.time()
    model.train()
    for step in range(steps):
        window = torch.from_numpy(train.random_windows(rng, t.micro_batch, length))
        sigma = torch.exp(lo + (hi - lo) * torch.rand(t.micro_batch, generator=g))
        noise = torch.randn(t.micro_batch, length - 1, E.shape[1], generator=g)
        loss, _, _ = train_step(engine, family, job, window, (sigma, noise), StepInfo(seed, step, 0))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            rate = (step + 1) * t.micro_batch * (length - 1) / (time.time() - t0)
            log(f"[calibrate] step {step + 1}/{steps}  loss {loss.item():.3f}  {rate:,.0f} tok/s")
    model.eval()
    windows = torch.from_numpy(val.fixed_windows(val_windows, length, seed=seed + 1))
    sigmas = np.exp(np.linspace(lo, hi, grid_points)).tolist()
    sigmas[0], sigmas[-1] = d.sigma_min, d.sigma_max
    ce = []
    with torch.no_grad():
        for s in sigmas:
            gs = torch.Generator().manual_seed(seed + 2)
            total = 0.0
            for i in range(0, val_windows, t.micro_batch):
                w = windows[i : i + t.micro_batch]
                noise = torch.randn(w.shape[0], length - 1, E.shape[1], generator=gs)
                draw = (torch.full((w.shape[0],), s), noise)
                _, per_seq = family.loss(job, model, w, draw, StepInfo(seed, 0, 0))
                total += per_seq.sum().item()
            ce.append(total / val_windows)
    return {
        "sigma": sigmas,
        "ce": ce,
        "lognormal_cdf": [lognormal_cdf(b, d.P_mean, d.P_std) for b in sigmas],
        "steps": steps,
        "layers": layers,
        "val_windows": val_windows,
        "seconds": round(time.time() - t0, 1),
    }
