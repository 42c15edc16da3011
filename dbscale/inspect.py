"""What a config will build, without building it: partition, layers, parameter counts, memory estimate."""

from __future__ import annotations

import torch

from dbscale.config import Config
from dbscale.models.llama import DenoiserBlock, LlamaLM
from dbscale.models.masked import MaskedDenoiser
from dbscale.run import partition_record

# fp32 weights (4) + fp32 gradients (4) + AdamW moments (8) per parameter, before any ZeRO sharding.
BYTES_PER_PARAM_TRAINING = 16


def dry_run_report(cfg: Config) -> dict:
    vocab = cfg.data.vocab_size  # the tokenizer is fit at prepare time; its size is this value
    with torch.device("meta"):
        if cfg.model.family == "huginn":
            from dbscale.models.huginn import HuginnDenoiser, HuginnLM

            e2e = HuginnLM(cfg.model, vocab)
            table = torch.empty(vocab, cfg.model.embed_dim)
            blocks = [HuginnDenoiser(cfg.model, vocab, cfg.diffusion.sigma_data, table) for _ in cfg.layer_allocation()]
        elif cfg.model.family == "masked":
            e2e = MaskedDenoiser(cfg.model, vocab, cfg.model.n_layers)
            blocks = [MaskedDenoiser(cfg.model, vocab, n) for n in cfg.layer_allocation()]
        else:
            e2e = LlamaLM(cfg.model, vocab)
            table = torch.empty(vocab, cfg.model.embed_dim)
            blocks = [
                DenoiserBlock(cfg.model, vocab, n, cfg.diffusion.sigma_data, table) for n in cfg.layer_allocation()
            ]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    e2e_params = count(e2e)
    block_params = [count(b) for b in blocks]
    return {
        "config": cfg.to_dict(),
        "partition": partition_record(cfg),
        "layers_per_block": cfg.layer_allocation(),
        "parameters": {"e2e": e2e_params, "blocks": block_params, "blocks_total": sum(block_params)},
        "memory_estimate": {
            "note": "weights + grads + AdamW state, fp32, one process, before ZeRO sharding; excludes "
            "activations. An estimate for planning; bench/ measures.",
            "e2e_bytes": e2e_params * BYTES_PER_PARAM_TRAINING,
            "block_bytes": [p * BYTES_PER_PARAM_TRAINING for p in block_params],
        },
    }
