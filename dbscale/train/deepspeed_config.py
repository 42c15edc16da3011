"""The DeepSpeed config of a job, derived from the run's TrainConfig (one source of truth)."""

from __future__ import annotations

import math

import torch

from dbscale.config import TrainConfig


def use_bf16(train: TrainConfig) -> bool:
    if train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return train.precision == "bf16"


def zero_config(train: TrainConfig, on_gpu: bool) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        # pinned host memory makes the gradient and weight copies asynchronous; there is no device on CPU
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return zero


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    on_gpu = torch.cuda.is_available()
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_config(train, on_gpu),
        "bf16": {"enabled": use_bf16(train)},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # DeepSpeed's default on CPU is a C++ FusedAdam JIT-compiled on first use (~80 s);
                # torch's AdamW needs no compile. On GPU the fused CUDA kernel is used, or with
                # offload_optimizer DeepSpeed's CPU Adam (the same update, vectorised for the host).
                "torch_adam": not on_gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(train: TrainConfig, schedule: dict | None = None):
    """Linear warm-up, then cosine / linear decay to min_lr_ratio, or constant. Multiplier of train.lr.

    schedule: {"steps": the total the job started with, "extensions": [[from_step, to_step, start], ...]}, what a
    job's checkpoints record. An extension is added when a job is resumed with a larger train.steps: from
    from_step the multiplier decays in the same shape from `start`, the value it had reached there, to
    min_lr_ratio at to_step, so the learning rate never jumps. Default: no extension, train.steps."""
    total = (schedule or {}).get("steps", train.steps)
    extensions = (schedule or {}).get("extensions", [])

    def decay(progress: float) -> float:
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress

    def f(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            multiplier = (step + 1) / train.warmup_steps
        elif train.schedule == "constant":
            multiplier = 1.0
        else:
            span = max(1, total - train.warmup_steps)
            progress = min(1.0, (step - train.warmup_steps) / span)
            multiplier = train.min_lr_ratio + (1 - train.min_lr_ratio) * decay(progress)
        for start_step, end_step, start in extensions:
            if step >= start_step and train.schedule != "constant":
                progress = min(1.0, (step - start_step) / max(1, end_step - start_step))
                multiplier = train.min_lr_ratio + (start - train.min_lr_ratio) * decay(progress)
        return multiplier

    return f
