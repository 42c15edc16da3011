"""The single-stream AR denoiser block (model.block 'stream', docs/METHOD.md 5c): its logits against a
hand-computed prior + evidence, the sigma-free prior's independence of sigma, one KV cache per block, and the
chain's cached, batched and teacher-forced runs against each other."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize

from dbscale.config import Config, ModelConfig
from dbscale.errors import ConfigError
from dbscale.families import config_from_dict
from dbscale.generate import generate_ids
from dbscale.models.llama import DiffusionBlocksLM, LlamaLM, StreamBlock, denoiser_loss, frozen_target_embedding

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_multiple_of=32, seq_len=24, block="stream")
SIGMA_FREE = dataclasses.replace(CFG, time_conditioning=False)
V = 61
TABLE = frozen_target_embedding(V, CFG.embed_dim, 0)


def test_sigma_free_block_is_a_plain_lm_plus_the_evidence():
    """Brute force: the block's layers, norm and head are those of a LlamaLM of its depth (same weights), and
    the logits of noisy position i are that LM's logits at row i-1 plus <z_i, E_v> / sigma^2."""
    block = randomize(StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE)).double()
    lm = LlamaLM(dataclasses.replace(SIGMA_FREE, n_layers=2), V).double().eval()
    missing, unexpected = lm.load_state_dict(block.state_dict(), strict=False)
    assert not missing and not unexpected  # the same parameters, by name
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, V, (2, 8), generator=g)
    z = torch.randn(2, 7, CFG.embed_dim, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    _, logits = block(window[:, :-1], z, sigma)
    prior = lm(window[:, :-1])
    by_hand = prior + torch.einsum("bte,ve->btv", z, TABLE.double()) / sigma.view(2, 1, 1) ** 2
    torch.testing.assert_close(logits, by_hand)
    # and the CE the loss sees is the CE of those logits, the prior's CE that of the LM
    targets = window[:, 1:]
    _, ce = block(window[:, :-1], z, sigma, targets=targets, prior_ce=True)
    torch.testing.assert_close(ce[..., 0], F.cross_entropy(by_hand.transpose(1, 2), targets, reduction="none"))
    torch.testing.assert_close(ce[..., 1], F.cross_entropy(prior.transpose(1, 2), targets, reduction="none"))


def test_sigma_free_prior_is_identical_for_every_sigma():
    block = randomize(StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE))
    g = torch.Generator().manual_seed(2)
    window = torch.randint(0, V, (3, 9), generator=g)
    z = torch.randn(3, 8, CFG.embed_dim, generator=g)
    priors = [block(window[:, :-1], z, torch.full((3,), s), with_evidence=False)[1] for s in (0.002, 0.5, 80.0)]
    assert torch.equal(priors[0], priors[1]) and torch.equal(priors[1], priors[2])
    per_position = block(window[:, :-1], z, torch.rand(3, 8, generator=g) + 0.1, with_evidence=False)[1]
    assert torch.equal(per_position, priors[0])


def test_noise_conditioned_stream_block_reads_sigma_and_its_mask_is_causal():
    block = randomize(StreamBlock(CFG, V, 2, 0.5, TABLE))
    g = torch.Generator().manual_seed(3)
    window = torch.randint(0, V, (1, 9), generator=g)
    z = torch.randn(1, 8, CFG.embed_dim, generator=g)
    a = block(window[:, :-1], z, torch.tensor([0.1]), with_evidence=False)[1]
    b = block(window[:, :-1], z, torch.tensor([3.0]), with_evidence=False)[1]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="one sigma per sequence"):
        block(window[:, :-1], z, torch.rand(1, 8))
    for j in range(8):  # changing x_j changes the predictions for x_{j+1}.. only
        changed = window.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        c = block(changed[:, :-1], z, torch.tensor([0.1]), with_evidence=False)[1]
        assert torch.equal(c[0, :j], a[0, :j]) and not torch.allclose(c[0, j], a[0, j])


def test_loss_with_sigma_per_position_equals_the_per_target_brute_force():
    block = randomize(StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE)).double()
    E = TABLE.double()
    g = torch.Generator().manual_seed(4)
    window = torch.randint(0, V, (2, 7), generator=g)
    sigma = torch.rand(2, 6, generator=g, dtype=torch.float64) * 2 + 0.05
    noise = torch.randn(2, 6, CFG.embed_dim, generator=g, dtype=torch.float64)
    loss, ce = denoiser_loss(block, window, E, sigma, noise, "edm", 0.5, prior_weight=0.5)
    total, prior_total = 0.0, 0.0
    for b in range(2):
        for i in range(6):  # one target at a time, with its own sigma
            z = E[window[b, i + 1]] + sigma[b, i] * noise[b, i]
            _, row = block(window[b : b + 1, : i + 1], z.view(1, 1, -1), sigma[b, i].view(1))
            logp = row[0, -1].log_softmax(-1)[window[b, i + 1]]
            prior = block(window[b : b + 1, : i + 1], z.view(1, 1, -1), sigma[b, i].view(1), with_evidence=False)[1]
            w = (sigma[b, i] ** 2 + 0.25) / (sigma[b, i] * 0.5) ** 2
            total += -w * logp
            prior_total += -prior[0, -1].log_softmax(-1)[window[b, i + 1]]
    assert loss.item() == pytest.approx((total / 12 + 0.5 * prior_total / 12).item(), rel=1e-9)
    assert ce.shape == (2,)


def chain(design: ModelConfig, steps: int | None = None, estimate: str = "mean", step: str = "euler"):
    cfg = Config(model=design)
    cfg.diffusion.num_blocks = 2
    cfg.diffusion.sample_steps = steps
    cfg.diffusion.sample_estimate, cfg.diffusion.sample_step = estimate, step
    model = DiffusionBlocksLM(cfg, V, TABLE)
    for b, block in enumerate(model.blocks):
        randomize(block, seed=b)
    return model.eval()


def test_sigma_free_chain_keeps_one_cache_per_block_and_runs_each_block_once_per_token():
    model = chain(SIGMA_FREE, steps=6)
    assert model.sigma_free and len(model.new_cache()) == 2
    assert not chain(CFG, steps=6).sigma_free and len(chain(CFG, steps=6).new_cache()) == 6
    calls = []
    for block in model.blocks:
        block.layers[0].register_forward_hook(lambda *a: calls.append(1))
    generate_ids(model, [3, 14, 15], max_new_tokens=5, temperature=1.0, seed=2)
    assert len(calls) == 2 * 5  # prompt once + each new token once (4 calls), per block; 6 steps reuse them


@pytest.mark.parametrize("design", [CFG, SIGMA_FREE], ids=["adaln", "sigma-free"])
@pytest.mark.parametrize("estimate, step", [("mean", "euler"), ("sample", "ancestral")])
def test_stream_chain_cached_uncached_batched_and_teacher_forced_agree(design, estimate, step):
    model = chain(design, steps=4, estimate=estimate, step=step).double()  # float64: a difference is a bug
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    cached = generate_ids(model, [3, 14, 15, 9], use_cache=True, **kw)
    assert cached == generate_ids(model, [3, 14, 15, 9], use_cache=False, **kw)
    windows = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(7))
    batched = model.teacher_forced_logits(windows, seed=5, temperature=1.0, top_p=0.9)
    both = model.new_cache()
    for i in range(7):
        rows = model.next_token_logits(both, windows[:, i : i + 1], [5, 6], temperature=1.0, top_p=0.9)
        for b in range(2):
            # the chain's state is fp32 and the last step's logits scale it by 1/sigma_min^2 = 2.5e5, so its
            # rounding (1e-7) becomes about 0.03 there
            torch.testing.assert_close(rows[b], batched[b, i], rtol=1e-3, atol=0.1)
            assert rows[b].argmax() == batched[b, i].argmax()


def test_config_refuses_what_the_stream_block_cannot_be():
    base = {"model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "block": "stream"}, "diffusion": {"num_blocks": 2}}
    with pytest.raises(ConfigError, match=r"model\.head: 'target' is a two-stream block's setting"):
        config_from_dict({**base, "model": {**base["model"], "head": "target"}})
    with pytest.raises(ConfigError, match=r"model\.time_conditioning: false makes the single-stream"):
        config_from_dict({**base, "model": {**base["model"], "block": "two_stream", "time_conditioning": False}})
    with pytest.raises(ConfigError, match=r"diffusion\.sigma_draw: 'position' needs the sigma-free block"):
        config_from_dict({**base, "diffusion": {"num_blocks": 2, "sigma_draw": "position"}})
    ok = {**base, "model": {**base["model"], "time_conditioning": False}}
    assert config_from_dict({**ok, "diffusion": {"num_blocks": 2, "sigma_draw": "position"}}).diffusion.sigma_draw


@pytest.mark.parametrize("estimate, step", [("mean", "euler"), ("sample", "ancestral"), ("argmax", "euler")])
def test_top_k_chain_with_every_token_is_the_exact_chain(estimate, step):
    """candidates() with k = V holds every token (B times, repeats at -inf): the same draws, the same tokens and
    the same final logits as the chain over the whole table."""
    exact = chain(SIGMA_FREE, steps=4, estimate=estimate, step=step).double()
    top = chain(SIGMA_FREE, steps=4, estimate=estimate, step=step).double()
    top.set_top_k(V)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert generate_ids(top, [3, 14, 15], **kw) == generate_ids(exact, [3, 14, 15], **kw)
    caches = exact.new_cache(), top.new_cache()
    window = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(8))
    for i in range(5):
        a, b = (m.next_token_logits(c, window[:, i : i + 1], [1, 2], 1.0, 0.9) for m, c in zip((exact, top), caches))
        torch.testing.assert_close(a, b, rtol=1e-3, atol=0.1)  # fp32 chain state, logits ~ 1/sigma_min^2
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_top_k_chain_samples_only_candidates_and_batches_as_one_at_a_time():
    model = chain(SIGMA_FREE, steps=4, estimate="sample", step="ancestral")
    model.set_top_k(3)
    cache = model.new_cache()
    window = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(9))
    for i in range(4):
        logits = model.next_token_logits(cache, window[:, i : i + 1], [4, 5], temperature=1.0)
        finite = torch.isfinite(logits).sum(-1)
        assert bool(((finite >= 3) & (finite <= 6)).all())  # the union of two blocks' top 3
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=8)
    from dbscale.generate import generate_batch

    prompts = [[3, 14, 15], [9, 2, 6, 5]]
    assert generate_batch(model, prompts, 6, 1.0, 0.9, [8, 9], batch_size=2) == [
        generate_ids(model, p, **{**kw, "seed": s}) for p, s in zip(prompts, [8, 9])
    ]
    with pytest.raises(ValueError, match="sigma-free blocks"):
        chain(CFG, steps=4).set_top_k(3)


@pytest.mark.parametrize("weighting", ["none", "edm"])
def test_noisy_fraction_of_a_stream_block_keeps_the_prior_on_every_target(weighting):
    """With a subset of positions the single-stream block's posterior term is the full loss's at those positions
    and its prior term the full prior term (the prior costs no extra layer rows), by brute force on the full CE."""
    block = randomize(StreamBlock(SIGMA_FREE, V, 2, 0.5, TABLE)).double()
    E = TABLE.double()
    g = torch.Generator().manual_seed(6)
    window = torch.randint(0, V, (2, 9), generator=g)
    sigma = torch.rand(2, 8, generator=g, dtype=torch.float64) + 0.05
    noise = torch.randn(2, 8, CFG.embed_dim, generator=g, dtype=torch.float64)
    positions = torch.tensor([1, 4, 5])
    for chunk in (0, 5):
        loss, ce = denoiser_loss(block, window, E, sigma, noise, weighting, 0.5, chunk, 0.7, positions, True)
        z = E[window[:, 1:]] + sigma[..., None] * noise
        _, full = block(window[:, :-1], z, sigma, targets=window[:, 1:], prior_ce=True)
        post = full[:, positions, 0]
        w = (sigma[:, positions] ** 2 + 0.25) / (sigma[:, positions] * 0.5) ** 2 if weighting == "edm" else 1.0
        expected = (w * post).mean() + 0.7 * full[..., 1].mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
        torch.testing.assert_close(ce, post.mean(1))
