"""diffusion.noisy_fraction: a block's training step denoises a random subset of the positions.

The stream mask lets a noisy position see only clean tokens and itself, so the per-token loss of a noisy
position cannot depend on which other noisy positions are in the step. The subset step is therefore checked
against a second computation: the full step's per-token losses at the same positions, with the same sigma
and noise."""

import dataclasses

import pytest
import torch
from helpers import CFG, V, randomize

from dbscale.config import ConfigError
from dbscale.families import config_from_dict
from dbscale.models.huginn import HuginnConfig, HuginnDenoiser
from dbscale.models.llama import DenoiserBlock, denoiser_block, denoiser_loss, frozen_target_embedding

E = frozen_target_embedding(V, CFG.embed_dim, 0)
POSITIONS = torch.tensor([0, 3, 4, 7])  # of T = 8 targets: the first, two neighbours, the last


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(0, V, (3, 9), generator=g)
    sigma = torch.tensor([0.05, 0.7, 20.0])
    noise = torch.randn(3, 8, CFG.embed_dim, generator=g)
    return window, sigma, noise


@pytest.mark.parametrize("layout", ["two_stream", "paper"])
def test_subset_step_equals_the_full_steps_losses_at_those_positions(layout):
    block = randomize(denoiser_block(dataclasses.replace(CFG, block=layout), V, 2, 0.5, E)).train()
    window, sigma, noise = _setup()
    targets = window[:, 1:]
    z = E[targets] + sigma.view(-1, 1, 1) * noise
    _, full = block(window[:, :-1], z, sigma, targets=targets)  # (B, T) per-token CE, every position
    for chunk in (0, 3):
        loss, per_seq = denoiser_loss(block, window, E, sigma, noise, "none", 0.5, chunk, positions=POSITIONS)
        torch.testing.assert_close(per_seq, full[:, POSITIONS].mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, full[:, POSITIONS].mean(), rtol=1e-5, atol=1e-5)
    assert (full[:, POSITIONS].mean() - full.mean()).abs() > 1e-3  # the subset is a different objective


def test_subset_gradients_and_prior_term_match_the_full_step():
    block = randomize(DenoiserBlock(CFG, V, 2, 0.5, E)).train()
    window, sigma, noise = _setup(1)
    targets = window[:, 1:]
    z = E[targets] + sigma.view(-1, 1, 1) * noise
    _, both = block(window[:, :-1], z, sigma, targets=targets, prior_ce=True)
    expected = both[:, POSITIONS, 0].mean() + 0.5 * both[:, POSITIONS, 1].mean()
    block.zero_grad()
    expected.backward()
    want = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    loss, _ = denoiser_loss(block, window, E, sigma, noise, "none", 0.5, 0, prior_weight=0.5, positions=POSITIONS)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    loss.backward()
    for p, g in zip(block.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_huginn_core_takes_the_subset_too():
    cfg = dataclasses.replace(CFG, family_config=HuginnConfig(prelude_layers=1, core_layers=1, coda_layers=1))
    core = randomize(HuginnDenoiser(cfg, V, 0.5, E)).train()
    window, sigma, noise = _setup(2)
    targets = window[:, 1:]
    _, full = core(window[:, :-1], E[targets] + sigma.view(-1, 1, 1) * noise, sigma, targets=targets)
    _, per_seq = denoiser_loss(core, window, E, sigma, noise, "none", 0.5, positions=POSITIONS)
    torch.testing.assert_close(per_seq, full[:, POSITIONS].mean(1), rtol=1e-5, atol=1e-5)


def test_family_draw_subset_is_seeded_and_validation_scores_every_position(tiny_cfg, tmp_path):
    """GaussianFamily: at fraction 1 the draw is (sigma, noise) as before; below 1 the same sigma and noise
    plus round(f T) sorted distinct positions, a pure function of the seed. A training micro-batch's loss uses
    them; validation (StepInfo index -1) scores every position, i.e. the fraction-1 loss."""
    from dbscale import families
    from dbscale.create_run import prepare_run
    from dbscale.families.base import StepInfo

    run = prepare_run(tiny_cfg(), tmp_path / "run", log=lambda *a: None)
    family = families.get("llama")
    T = run.config.model.seq_len
    window = torch.randint(0, run.vocab_size, (2, T + 1))
    job = family.job(run, 0)
    full_draw = family.draw(job, window, noise_seed=5)
    assert len(full_draw) == 2
    job.cfg = dataclasses.replace(run.config, diffusion=dataclasses.replace(run.config.diffusion, noisy_fraction=0.25))
    draw = family.draw(job, window, noise_seed=5)
    sigma, noise, positions = draw
    torch.testing.assert_close(sigma, full_draw[0], rtol=0, atol=0)
    torch.testing.assert_close(noise, full_draw[1], rtol=0, atol=0)
    assert len(positions) == round(0.25 * T)
    assert positions.unique().tolist() == positions.tolist()  # sorted and distinct
    assert 0 <= positions.min() and positions.max() < T
    assert torch.equal(family.draw(job, window, noise_seed=5)[2], positions)
    assert not torch.equal(family.draw(job, window, noise_seed=6)[2], positions)

    torch.manual_seed(0)
    model = family.build(job)
    train_loss, _ = family.loss(job, model, window, draw, StepInfo(0, 0, 0))
    val_loss, _ = family.loss(job, model, window, draw, StepInfo(0, -1, 0))
    full_loss, _ = family.loss(job, model, window, full_draw, StepInfo(0, 0, 0))
    assert val_loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    d = job.cfg.diffusion
    table = run.load_target_embedding()
    subset, _ = denoiser_loss(
        model, window, table, sigma, noise, d.loss_weighting, d.sigma_data, 0, d.prior_loss, positions
    )
    assert train_loss.item() == pytest.approx(subset.item(), rel=1e-6)
    assert train_loss.item() != pytest.approx(full_loss.item(), rel=1e-4)


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_noisy_fraction_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"diffusion.noisy_fraction: must be in \(0, 1\]"):
        config_from_dict({"diffusion": {"noisy_fraction": value}})


def test_noisy_fraction_is_refused_by_the_masked_family():
    with pytest.raises(ConfigError, match=r"diffusion.noisy_fraction: is read by the AR families"):
        config_from_dict({"model": {"family": "masked"}, "diffusion": {"noisy_fraction": 0.5}})
