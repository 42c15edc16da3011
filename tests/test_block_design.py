"""The denoiser block's design switches and the chain's sampler, against brute force and second implementations."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from helpers import CFG, V, randomize

from dbscale.config import Config, ConfigError, frozen_config_from_dict
from dbscale.diffusion.sampler import ancestral_step, clean_estimate, draw_tokens, nucleus
from dbscale.families import config_from_dict, sections
from dbscale.generate import generate_ids
from dbscale.models.layers import TransformerLayer, rope_cos_sin, zero_init_adaln
from dbscale.models.llama import DenoiserBlock, DiffusionBlocksLM, PaperBlock, denoiser_loss, frozen_target_embedding

DBSCALE = CFG  # dbscale's default block: noisy input 'token', posterior readout, normal readout init, adaLN-Zero
PAPER = dataclasses.replace(CFG, block="paper")
E = frozen_target_embedding(V, CFG.embed_dim, 0)


def test_posterior_readout_adds_the_exact_gaussian_log_likelihood():
    """With the network's prior zeroed, the block's distribution is the Bayes posterior under a uniform prior:
    softmax over v of log N(z; E_v, sigma^2 I), computed here directly from the Gaussian density."""
    block = DenoiserBlock(DBSCALE, V, 2, 0.5, E).eval()
    torch.nn.init.zeros_(block.lm_head.weight)  # the prior: uniform
    window = torch.randint(0, V, (2, 7))
    sigma = torch.tensor([0.3, 1.7])
    z = E[window[:, 1:]] + sigma.view(-1, 1, 1) * torch.randn(2, 6, CFG.embed_dim)
    D, logits = block(window[:, :-1], z, sigma)
    assert D is None
    log_density = -((z[:, :, None, :] - E[None, None]) ** 2).sum(-1) / (2 * sigma.view(-1, 1, 1) ** 2)
    torch.testing.assert_close(logits.log_softmax(-1), log_density.log_softmax(-1), rtol=1e-4, atol=1e-4)


def test_posterior_readout_loss_matches_its_logits_and_chunks():
    block = randomize(DenoiserBlock(DBSCALE, V, 2, 0.5, E)).train()
    window = torch.randint(0, V, (3, 9))
    sigma, noise = torch.tensor([0.05, 0.4, 9.0]), torch.randn(3, 8, CFG.embed_dim)
    z = E[window[:, 1:]] + sigma.view(-1, 1, 1) * noise
    _, logits = block(window[:, :-1], z, sigma)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none")
    for chunk in (0, 5):
        _, per_token = block(window[:, :-1], z, sigma, targets=window[:, 1:], ce_chunk=chunk)
        torch.testing.assert_close(per_token, ce, rtol=1e-5, atol=1e-5)
        loss, per_seq = denoiser_loss(block, window, E, sigma, noise, "none", 0.5, chunk)
        torch.testing.assert_close(per_seq, ce.mean(1), rtol=1e-5, atol=1e-5)


def test_prior_loss_is_the_ce_of_the_logits_less_the_evidence():
    """diffusion.prior_loss: the prior term is the CE of the block's logits with the Gaussian evidence
    <z, E_v> / sigma^2 subtracted (its context-only prediction), computed here from the logits by hand; the
    posterior part and the per-sequence CE are unchanged; chunked == unchunked, gradients included."""
    block = randomize(DenoiserBlock(DBSCALE, V, 2, 0.5, E)).train()
    g = torch.Generator().manual_seed(0)  # fixed draws: the chunked gradients' rounding is then fixed too
    window = torch.randint(0, V, (3, 9), generator=g)
    sigma, noise = torch.tensor([0.05, 0.4, 9.0]), torch.randn(3, 8, CFG.embed_dim, generator=g)
    targets = window[:, 1:]
    z = E[targets] + sigma.view(-1, 1, 1) * noise
    _, logits = block(window[:, :-1], z, sigma)
    prior_logits = logits - (z / sigma.view(-1, 1, 1) ** 2) @ E.T
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    prior_ce = torch.nn.functional.cross_entropy(prior_logits.transpose(1, 2), targets, reduction="none")
    assert (prior_ce.mean() - ce.mean()).abs() > 0.1  # the two terms differ: the test can tell them apart
    grads = []
    for chunk in (0, 5):
        _, both = block(window[:, :-1], z, sigma, targets=targets, ce_chunk=chunk, prior_ce=True)
        assert both.shape == (3, 8, 2)
        torch.testing.assert_close(both[..., 0], ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[..., 1], prior_ce, rtol=1e-5, atol=1e-5)
        block.zero_grad()
        loss, per_seq = denoiser_loss(block, window, E, sigma, noise, "none", 0.5, chunk, prior_weight=0.7)
        torch.testing.assert_close(loss, ce.mean() + 0.7 * prior_ce.mean(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_seq, ce.mean(1), rtol=1e-5, atol=1e-5)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    weighted, _ = denoiser_loss(block, window, E, sigma, noise, "edm", 0.5, 0, prior_weight=0.7)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # EDM's weight applies to the posterior term only
    torch.testing.assert_close(weighted, (w * ce.mean(1)).mean() + 0.7 * prior_ce.mean(), rtol=1e-5, atol=1e-5)


def test_prior_ce_is_refused_where_there_is_no_prior():
    block = PaperBlock(PAPER, V, 1, 0.5, E)
    window, sigma = torch.randint(0, V, (1, 5)), torch.tensor([1.0])
    with pytest.raises(ValueError, match="the paper's block \\(EDM readout\\) has no separate prior"):
        block(window[:, :-1], torch.randn(1, 4, CFG.embed_dim), sigma, targets=window[:, 1:], prior_ce=True)
    with pytest.raises(ConfigError, match=r"diffusion.prior_loss: must be >= 0"):
        config_from_dict({"diffusion": {"prior_loss": -1}})


def test_the_family_loss_adds_the_prior_term_only_to_posterior_blocks(tiny_cfg, tmp_path):
    """GaussianFamily.loss: dbscale's block (posterior readout) gets diffusion.prior_loss, the paper's block
    (EDM readout) none, and prior_loss 0 gives the posterior CE alone."""
    from dbscale import families
    from dbscale.create_run import prepare_run
    from dbscale.families.base import StepInfo

    run = prepare_run(tiny_cfg(), tmp_path / "run", log=lambda *a: None)
    family = families.get("llama")
    window = torch.randint(0, run.vocab_size, (2, run.config.model.seq_len + 1))
    losses = {}
    for readout, prior in (("posterior", 0.0), ("posterior", 1.0), ("posterior", 2.0), ("edm", 1.0)):
        cfg = dataclasses.replace(
            run.config,
            model=dataclasses.replace(run.config.model, block="paper" if readout == "edm" else "two_stream"),
            diffusion=dataclasses.replace(run.config.diffusion, prior_loss=prior),
        )
        job = family.job(run, 0)
        job.cfg = cfg
        torch.manual_seed(0)
        model = family.build(job)
        draw = family.draw(job, window, noise_seed=3)
        loss, _ = family.loss(job, model, window, draw, StepInfo(0, 0, 0))
        losses[readout, prior] = loss.item()
        if readout == "edm":  # no prior term: exactly the posterior-only objective of that block
            d = cfg.diffusion
            table = run.load_target_embedding()
            alone, _ = denoiser_loss(model, window, table, *draw, d.loss_weighting, d.sigma_data, 0, prior_weight=0.0)
            assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    gap = losses["posterior", 1.0] - losses["posterior", 0.0]
    assert gap > 0.5  # the prior CE of a fresh block is about ln V
    assert losses["posterior", 2.0] - losses["posterior", 0.0] == pytest.approx(2 * gap, rel=1e-4)


def test_token_on_the_noisy_stream_keeps_causality():
    """The noisy position predicting x_i reads x_{i-1}'s embedding: it must depend on x_0..x_{i-1}, on each of
    them, and on nothing later (brute force over every context token)."""
    block = randomize(DenoiserBlock(DBSCALE, V, 1, 0.5, E.double()).double())  # every layer acts, in fp64
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(0.3)  # small weights: no saturated attention
    T = 7
    window = torch.randint(0, V, (1, T + 1), generator=torch.Generator().manual_seed(4))
    z = torch.randn(1, T, CFG.embed_dim, dtype=torch.float64)
    sigma = torch.tensor([0.6], dtype=torch.float64)
    _, base = block(window[:, :-1], z, sigma)
    for j in range(T):
        changed = window.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        _, logits = block(changed[:, :-1], z, sigma)
        for i in range(T):
            diff = (logits[0, i] - base[0, i]).abs().max().item()
            assert (diff == 0.0) if j > i else (diff > 1e-9), (i, j, diff)


def test_token_on_the_noisy_stream_is_the_preceding_clean_input():
    """A one-layer block with attention and MLP gated shut (adaLN-Zero): the noisy stream's hidden state is
    exactly the embedding of the token it follows, and it does not depend on z."""
    block = DenoiserBlock(DBSCALE, V, 1, 0.5, E).eval()
    seen = {}
    block.layers[0].register_forward_hook(lambda m, args, out: seen.update(h=out))
    window = torch.randint(0, V, (1, 6))
    sigma = torch.tensor([2.0])
    block(window[:, :-1], torch.randn(1, 5, CFG.embed_dim), sigma)
    torch.testing.assert_close(seen["h"][:, 5:], block.embed_tokens(window[:, :-1]))
    first = seen["h"].clone()
    block(window[:, :-1], torch.randn(1, 5, CFG.embed_dim), sigma)
    torch.testing.assert_close(seen["h"], first, rtol=0, atol=0)


def test_open_gates_make_the_plain_prenorm_layer():
    torch.manual_seed(0)
    plain, gated = TransformerLayer(CFG), TransformerLayer(CFG, adaln=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    zero_init_adaln(torch.nn.ModuleList([gated]), gate=1.0)
    x = torch.randn(2, 6, CFG.d_model)
    cos, sin = rope_cos_sin(torch.arange(6), CFG.head_dim, CFG.rope_theta)
    cond = torch.randn(2, CFG.d_model)
    torch.testing.assert_close(gated(x, cos, sin, None, cond), plain(x, cos, sin, None))


def test_readout_init_normal_starts_off_the_saddle():
    paper = PaperBlock(PAPER, V, 1, 0.5)
    ours = DenoiserBlock(DBSCALE, V, 1, 0.5, E)
    assert paper.lm_head.weight.abs().sum() == 0 and paper.out_proj.weight.abs().sum() == 0
    assert ours.lm_head.weight.std().item() == pytest.approx(CFG.init_std, rel=0.1)
    assert ours.out_proj.weight.std().item() == pytest.approx(CFG.init_std, rel=0.1)
    assert ours.final_adaLN.weight.abs().sum() == 0  # the final modulation still starts as the identity


def test_dbscale_block_has_no_noisy_input_projection():
    assert not hasattr(DenoiserBlock(DBSCALE, V, 1, 0.5, E), "in_proj")
    assert PaperBlock(PAPER, V, 1, 0.5).in_proj.weight.shape == (CFG.d_model, CFG.embed_dim)


def test_design_switches_are_validated():
    with pytest.raises(ConfigError, match=r"model.block: 'bayes' is not one of \['two_stream', 'stream', 'paper'\]"):
        config_from_dict({"model": {"block": "bayes"}})
    with pytest.raises(ConfigError, match=r"diffusion.sample_estimate: 'mode'"):
        config_from_dict({"diffusion": {"sample_estimate": "mode"}})
    with pytest.raises(ValueError, match="the posterior readout needs the"):
        DenoiserBlock(DBSCALE, V, 1, 0.5, None)


PAPER_SWITCHES = {"noisy_input": "z", "readout": "edm", "readout_init": "zero"}
OLD_DEFAULTS = {"noisy_input": "token", "readout": "posterior", "readout_init": "normal", "adaln_gate_init": "zero"}


def test_retired_switches_map_to_their_block(capsys):
    """A config written with the retired block switches: the paper's combination is model.block 'paper',
    dbscale's is its block unchanged, each with a note naming what to remove; a run's own record (every run
    before the retirement writes all four) loads silently as the block it trained."""
    cfg = config_from_dict({"model": dict(PAPER_SWITCHES)}, "old.yaml")
    assert cfg.model.block == "paper"
    note = capsys.readouterr().err
    assert "old.yaml" in note and "model.noisy_input, model.readout, model.readout_init" in note
    assert "model.block: paper" in note
    assert config_from_dict({"model": {"block": "stream", "noisy_input": "token"}}).model.block == "stream"
    assert "Remove model.noisy_input" in capsys.readouterr().err
    for record, block in ((OLD_DEFAULTS, "two_stream"), ({**OLD_DEFAULTS, **PAPER_SWITCHES}, "paper")):
        cfg = frozen_config_from_dict({"model": dict(record)}, "runs/old/config.yaml", sections=sections())
        assert cfg.model.block == block
        assert "noisy_input" not in cfg.to_dict()["model"]
    assert capsys.readouterr().err == ""


def test_a_run_directory_frozen_before_the_retirement_loads_as_it_trained():
    """tests/assets/config_a98d625.yaml is configs/llama_tiny.yaml as the last version with the switches froze
    it into a run: today's loader reads it as today's config of that recipe, every field equal."""
    import yaml

    root = Path(__file__).parent
    record = yaml.safe_load((root / "assets/config_a98d625.yaml").read_text())
    assert record["model"]["noisy_input"] == "token"  # the record holds the switches
    old = frozen_config_from_dict(record, "config_a98d625.yaml", sections=sections())
    today = config_from_dict(yaml.safe_load((root.parent / "configs/llama_tiny.yaml").read_text()))
    assert old.to_dict() == today.to_dict()


@pytest.mark.parametrize(
    "model, field",
    [
        ({"noisy_input": "token+z"}, "noisy_input"),  # measured +17.6% context-only CE
        ({"adaln_gate_init": "one"}, "adaln_gate_init"),
        ({"noisy_input": "z"}, "noisy_input"),  # the paper's input with dbscale's readout
        ({"block": "stream", **PAPER_SWITCHES}, "noisy_input"),
        ({"block": "paper", "readout": "posterior"}, "readout"),
    ],
)
def test_retired_switch_combinations_are_refused_with_the_fix(model, field):
    with pytest.raises(ConfigError, match=rf"my.yaml: model.{field}: .* retired design switch.* Fix: remove "):
        config_from_dict({"model": model}, "my.yaml")
    with pytest.raises(ConfigError, match=r"runs/r/config.yaml: model\.\w+: .*git checkout a98d625"):
        frozen_config_from_dict({"model": {**OLD_DEFAULTS, **model}}, "runs/r/config.yaml")


# ------------------------------------------------------------------------------------------------------------
# The sampler


def test_draw_tokens_follows_the_nucleus_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    u = torch.linspace(0, 1, 20001)[:-1]  # a uniform grid: the inverse CDF gives exact frequencies
    tokens = draw_tokens(logits.expand(len(u), 4), 1.0, 1.0, u)
    freq = torch.bincount(tokens, minlength=4).float() / len(u)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-3, rtol=0)
    tokens = draw_tokens(logits.expand(len(u), 4), 1.0, 0.75, u)  # nucleus {0, 1}: mass 0.8 >= 0.75
    freq = torch.bincount(tokens, minlength=4).float() / len(u)
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(nucleus(logits.softmax(-1), 0.75), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert draw_tokens(logits, 0.0, 1.0, torch.tensor(0.99)).item() == 0  # temperature 0 is greedy


def test_ancestral_step_is_the_forward_process_posterior():
    """Draw y, z_s = y + s eps, z_t = z_s + sqrt(t^2 - s^2) eps' (t > s); then z_s | z_t, y is Gaussian with the
    ancestral step's mean and variance (checked by Monte Carlo)."""
    g = torch.Generator().manual_seed(0)
    n, s, t = 200_000, 0.4, 1.3
    y = torch.randn(n, 1, generator=g)
    z_s = y + s * torch.randn(n, 1, generator=g)
    z_t = z_s + math.sqrt(t**2 - s**2) * torch.randn(n, 1, generator=g)
    mean = ancestral_step(z_t, y, t, s, torch.zeros_like(z_t))
    resid = z_s - mean
    assert abs(resid.mean().item()) < 5e-3
    assert resid.var().item() == pytest.approx(s**2 * (1 - (s / t) ** 2), rel=0.02)
    assert torch.allclose(ancestral_step(z_t, y, t, 0.0, torch.randn(n, 1)), y)  # sigma_next = 0: the estimate


def test_clean_estimates():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    table = torch.eye(3)
    torch.testing.assert_close(clean_estimate(logits, table, "mean"), logits.softmax(-1))
    torch.testing.assert_close(clean_estimate(logits, table, "argmax"), table[[0]])
    assert clean_estimate(logits, table, "sample", 1.0, 1.0, torch.tensor([0.999])).argmax().item() == 2


def test_clean_estimate_of_a_bf16_table_is_fp32_and_close():
    """bf16 weights (a GPU's precision): the softmax mean is formed in the table's dtype and handed on in fp32."""
    g = torch.Generator().manual_seed(0)
    logits, table = torch.randn(4, 50, generator=g) * 3, torch.randn(50, 16, generator=g)
    half = clean_estimate(logits, table.bfloat16(), "mean")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, clean_estimate(logits, table, "mean"), rtol=0, atol=2e-2)


def test_a_bf16_chain_predicts_what_the_fp32_chain_predicts():
    """The whole chain cast to bf16 (the sampler, the estimate, the posterior evidence) runs and agrees with fp32
    on the next token at nearly every position."""
    model = chain("mean", "euler")
    windows = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(3))
    full = model.teacher_forced_logits(windows, seed=5, temperature=1.0)
    half = chain("mean", "euler").to(torch.bfloat16).teacher_forced_logits(windows, seed=5, temperature=1.0)
    agree = (full.argmax(-1) == half.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def chain(estimate: str, step: str, design=DBSCALE) -> DiffusionBlocksLM:
    cfg = Config(model=design)
    cfg.diffusion.num_blocks = 2
    cfg.diffusion.sample_estimate, cfg.diffusion.sample_step = estimate, step
    model = DiffusionBlocksLM(cfg, V, E)
    for b, block in enumerate(model.blocks):
        randomize(block, seed=b)
    return model.eval()


SAMPLERS = [("mean", "euler"), ("argmax", "euler"), ("sample", "euler"), ("sample", "ancestral"), ("mean", "ancestral")]


@pytest.mark.parametrize("estimate, step", SAMPLERS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached_for_every_sampler(estimate, step, temperature):
    model = chain(estimate, step)
    kw = dict(max_new_tokens=10, temperature=temperature, top_p=0.9, seed=11)
    cached = generate_ids(model, [3, 14, 15, 9], use_cache=True, **kw)
    assert cached == generate_ids(model, [3, 14, 15, 9], use_cache=False, **kw)


@pytest.mark.parametrize("estimate, step", SAMPLERS)
def test_teacher_forced_chain_draws_as_generation_does(estimate, step):
    """Window b of the batched chain draws what generation with seed + b draws at each position."""
    model = chain(estimate, step)
    windows = torch.randint(0, V, (2, 8))
    batched = model.teacher_forced_logits(windows, seed=5, temperature=1.0, top_p=0.9)
    for b in range(2):
        cache = model.new_cache()
        for i in range(7):
            logits = model.next_token_logits(cache, windows[b : b + 1, i : i + 1], 5 + b, temperature=1.0, top_p=0.9)
            torch.testing.assert_close(logits[0], batched[b, i], rtol=1e-3, atol=1e-3)  # logits ~ 1/sigma_min^2
            assert logits[0].argmax() == batched[b, i].argmax()


def test_sampled_estimates_at_temperature_zero_are_the_argmax_chain():
    window = torch.randint(0, V, (2, 9))
    sampled, argmax = chain("sample", "ancestral"), chain("argmax", "ancestral")
    greedy = sampled.teacher_forced_logits(window, seed=1, temperature=0.0)
    torch.testing.assert_close(greedy, argmax.teacher_forced_logits(window, seed=1, temperature=1.0))
    one = sampled.teacher_forced_logits(window, seed=1, temperature=1.0).argmax(-1)
    two = sampled.teacher_forced_logits(window, seed=2, temperature=1.0).argmax(-1)
    assert not torch.equal(one, two)  # the draws depend on the seed


def test_heldout_sample_accuracy_of_a_plain_lm_is_its_expectation():
    import numpy as np

    from dbscale.generate import heldout_metrics
    from dbscale.models.llama import LlamaLM

    model = randomize(LlamaLM(CFG, V))
    windows = np.random.default_rng(0).integers(0, V, size=(3, 10))
    m = heldout_metrics(model, windows, batch_size=2, temperature=0.7, top_p=0.9)
    w = torch.from_numpy(windows)
    logits = model(w[:, :-1]).float()
    probs = nucleus(torch.softmax(logits / 0.7, -1), 0.9)
    expected = probs.gather(-1, w[:, 1:, None]).mean().item()
    assert m["sample_accuracy"] == pytest.approx(expected, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:]).item()
    assert m["ce"] == pytest.approx(ce, rel=1e-5) and "first_step_ce" not in m


def test_target_head_with_evidence_is_one_product_and_exact(monkeypatch):
    """model.head 'target' + the posterior readout: head and evidence read the same table, so the logits are
    (scale * h + z/sigma^2) @ E^T, one vocabulary-sized product; equal to the two products computed apart."""
    from dbscale.models.layers import Head

    head = Head(CFG.embed_dim, V, "target")
    with torch.no_grad():
        head.logit_scale.fill_(1.7)
    h, u = torch.randn(3, 5, CFG.embed_dim), 4.0 * torch.randn(3, 5, CFG.embed_dim)
    expected = torch.nn.functional.linear(h * 1.7, E) + torch.nn.functional.linear(u, E)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[1].shape) or linear(*a))
    torch.testing.assert_close(head(h, table=E, evidence=(u, E)), expected, rtol=1e-5, atol=1e-4)
    assert calls == [E.shape]
    calls.clear()  # a different table object: the two products, the same numbers
    torch.testing.assert_close(head(h, table=E.clone(), evidence=(u, E)), expected, rtol=1e-5, atol=1e-4)
    assert len(calls) == 2
