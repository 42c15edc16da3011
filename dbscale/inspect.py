"""What a config will build, without building it: partition, layers, parameter counts, memory estimate."""

from __future__ import annotations

import torch

from dbscale import families
from dbscale.config import Config
from dbscale.run import partition_record

# fp32 weights (4) + fp32 gradients (4) + AdamW moments (8) per parameter, before any ZeRO sharding.
BYTES_PER_PARAM_TRAINING = 16


def dry_run_report(cfg: Config) -> dict:
    vocab = cfg.data.vocab_size  # the tokenizer is fit at prepare time; its size is this value
    with torch.device("meta"):
        e2e, blocks = families.get(cfg.model.family).dry_run_models(cfg, vocab)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    e2e_params = count(e2e)
    block_params = [count(b) for b in blocks]
    return {
        "config": cfg.to_dict(),
        "partition": partition_record(cfg),
        "layers_per_block": families.layer_allocation(cfg),
        "parameters": {"e2e": e2e_params, "blocks": block_params, "blocks_total": sum(block_params)},
        "memory_estimate": {
            "note": "weights + grads + AdamW state, fp32, one process, before ZeRO sharding; excludes "
            "activations. An estimate for planning; bench/ measures.",
            "e2e_bytes": e2e_params * BYTES_PER_PARAM_TRAINING,
            "block_bytes": [p * BYTES_PER_PARAM_TRAINING for p in block_params],
        },
    }
