"""Stacked context (diffusion.stack_context): block b > 0 reads block b-1's frozen residual stream. Against a brute
force (the stacked chain's priors are those of one deep LM built from the blocks' layers), the training input
(frozen predecessors, no gradient into them), the sampler's cached and teacher-forced runs, and the run-level
rules: blocks train in order, a changed predecessor is refused on resume and at merge."""

import dataclasses
import sys

import pytest
import torch
from helpers import randomize, run_cli, tiny_config_dict

from dbscale.config import Config, ModelConfig
from dbscale.errors import ConfigError
from dbscale.families import config_from_dict
from dbscale.generate import generate_ids
from dbscale.models.llama import DiffusionBlocksLM, LlamaLM, StreamBlock, denoiser_loss, frozen_target_embedding

SIGMA_FREE = ModelConfig(
    n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, ffn_multiple_of=32, seq_len=24, block="stream",
    time_conditioning=False,
)  # fmt: skip
V = 61
TABLE = frozen_target_embedding(V, SIGMA_FREE.embed_dim, 0)
PY = sys.executable


def stacked_chain(steps: int = 4) -> DiffusionBlocksLM:
    cfg = Config(model=SIGMA_FREE)
    cfg.diffusion.num_blocks, cfg.diffusion.sample_steps, cfg.diffusion.stack_context = 2, steps, True
    model = DiffusionBlocksLM(cfg, V, TABLE)
    for b, block in enumerate(model.blocks):
        randomize(block, seed=b)
    return model.eval()


def deep_lm(model: DiffusionBlocksLM, upto: int) -> LlamaLM:
    """The LM of blocks 0..upto: block 0's embedding, their layers in order, block `upto`'s norm and head."""
    blocks = model.blocks[: upto + 1]
    layers = [layer for block in blocks for layer in block.layers]
    lm = LlamaLM(dataclasses.replace(SIGMA_FREE, n_layers=len(layers)), V).to(TABLE.dtype)
    lm.embed_tokens.load_state_dict(blocks[0].embed_tokens.state_dict())
    for mine, theirs in zip(lm.layers, layers, strict=True):
        mine.load_state_dict(theirs.state_dict())
    lm.norm.load_state_dict(blocks[-1].norm.state_dict())
    lm.lm_head.load_state_dict(blocks[-1].lm_head.state_dict())
    return lm.eval()


def test_stacked_priors_are_those_of_the_deep_lm_built_from_the_blocks():
    model = stacked_chain().double()
    assert not hasattr(model.blocks[1], "embed_tokens")  # a stacked block reads features, not ids
    window = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    priors = model.priors([window] * 2)
    for b in range(2):
        torch.testing.assert_close(priors[b], deep_lm(model, b).double()(window))


def test_a_stacked_block_trains_on_its_frozen_predecessor_and_no_gradient_crosses():
    model = stacked_chain()
    first, second = model.blocks
    trained = StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE, context_features=True)
    trained.load_state_dict(second.state_dict())
    trained.train().read_from([first])
    assert not any(n.startswith("_predecessors") for n, _ in trained.named_parameters())  # not its parameters
    assert set(trained.state_dict()) == set(second.state_dict())  # nor in its checkpoint
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, V, (3, 10), generator=g)
    sigma, noise = torch.rand(3, generator=g) + 0.1, torch.randn(3, 9, SIGMA_FREE.embed_dim, generator=g)
    loss, _ = denoiser_loss(trained, window, TABLE, sigma, noise, "none", 0.5, prior_weight=1.0)
    loss.backward()
    assert all(p.grad is None for p in first.parameters())  # the predecessor is frozen
    assert all(p.grad is not None for p in trained.parameters())
    # the same loss as feeding the predecessor's features by hand
    with torch.no_grad():
        features = first.residual(window[:, :-1])
        z = TABLE[window[:, 1:]] + sigma.view(3, 1, 1) * noise
        _, ce = second(features, z, sigma, targets=window[:, 1:], prior_ce=True)
        by_hand = ce[..., 0].mean() + ce[..., 1].mean()
    torch.testing.assert_close(loss.detach(), by_hand)
    with pytest.raises(ValueError, match="without its frozen predecessors"):
        StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE, context_features=True)(window[:, :-1], z, sigma)


def test_stacked_chain_cached_uncached_and_teacher_forced_agree():
    model = stacked_chain().double()
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=4)
    assert generate_ids(model, [3, 14, 15], use_cache=True, **kw) == generate_ids(
        model, [3, 14, 15], use_cache=False, **kw
    )
    windows = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(8))
    batched = model.teacher_forced_logits(windows, seed=5)
    cache = model.new_cache()
    for i in range(6):
        rows = model.next_token_logits(cache, windows[:, i : i + 1], [5, 6])
        for b in range(2):
            assert rows[b].argmax() == batched[b, i].argmax()


def test_config_refuses_stacking_a_block_whose_features_read_sigma():
    def config(**model):
        model = {"n_layers": 2, "d_model": 32, "n_heads": 2, **model}
        return config_from_dict({"model": model, "diffusion": {"num_blocks": 2, "stack_context": True}})

    for model in ({}, {"block": "stream"}):  # two-stream; noise-conditioned stream
        with pytest.raises(ConfigError, match=r"diffusion\.stack_context: true needs the Llama family's sigma-free"):
            config(**model)
    assert config(block="stream", time_conditioning=False).diffusion.stack_context
    with pytest.raises(ConfigError, match=r"diffusion\.stack_context: stacks the Llama family's sigma-free blocks"):
        config(family="masked", block="stream", time_conditioning=False)


def test_stacked_blocks_train_in_order_and_a_changed_predecessor_is_refused(speeches, tmp_path):
    """Block 1 refuses to start before block 0 has finished; trained in order the chain merges and generates;
    block 0 trained further (new weights) makes block 1's resume and the merge refuse, naming both blocks."""
    import yaml

    cfg = tiny_config_dict(
        [str(p) for p in speeches[:12]],
        model={"block": "stream", "time_conditioning": False},
        diffusion={"num_blocks": 2, "stack_context": True},
        train={"steps": 4, "save_every": 2, "val_every": 0},
    )
    config = tmp_path / "stacked.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"

    def block(b: int, *extra: str, expect: int | None = 0):
        return run_cli([PY, "launchers/train_block.py", "--run", str(run), "--block", str(b), *extra], expect)

    run_cli([PY, "tools/prepare.py", "--config", str(config), "--run", str(run)])
    early = block(1, expect=None)
    assert early.returncode != 0
    assert "block 1 reads the features of blocks 0..0 (diffusion.stack_context: true)" in early.stderr
    assert "block 0: no checkpoint" in early.stderr
    block(0)
    block(1)
    run_cli([PY, "tools/merge_blocks.py", "--run", str(run)])
    merged = run / "merged"
    from dbscale.merge import load_merged

    model = load_merged(merged)[0]
    assert model.stacked and model.blocks[1].context_features
    # block 0 changes after block 1 trained on it
    block(0, "--set", "train.steps=6")
    resumed = block(1, "--set", "train.steps=6", expect=None)
    assert resumed.returncode != 0 and "block 1 was trained on block 0 with weights sha256" in resumed.stderr
    refused = run_cli([PY, "tools/merge_blocks.py", "--run", str(run)], None)
    assert refused.returncode != 0 and "block 0 was retrained after block 1 trained on it" in refused.stderr
    assert (merged / "model.safetensors").exists()  # the earlier merge is kept
