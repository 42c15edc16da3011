"""The Llama family: masks against brute force, causality, KV-cache equivalence, zero-init behaviour."""

import copy
import dataclasses

import pytest
import torch
from helpers import CFG, V, randomize

from dbscale.config import Config, ModelConfig
from dbscale.diffusion.noise import edm_precond
from dbscale.families import config_from_dict
from dbscale.generate import generate_ids
from dbscale.models.layers import stream_attention_mask
from dbscale.models.llama import (
    DenoiserBlock,
    DiffusionBlocksLM,
    LlamaLM,
    PaperBlock,
    denoiser_block,
    denoiser_loss,
    frozen_target_embedding,
)

# the paper's denoiser block (noisy input z, EDM readout, zero-initialised readout); CFG is dbscale's default
PAPER = dataclasses.replace(CFG, block="paper")
TABLE = frozen_target_embedding(V, CFG.embed_dim, 0)


def test_mask_matches_brute_force_rule():
    T = 5
    pos = torch.cat([torch.arange(T), torch.arange(1, T + 1)])  # clean 0..T-1, noisy 1..T
    clean = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(T, dtype=torch.bool)])
    mask = stream_attention_mask(pos, clean, 2 * T)
    for q in range(2 * T):
        for k in range(2 * T):
            if q < T:  # clean query sees clean keys at positions <= its own
                expected = k < T and pos[k] <= pos[q]
            else:  # noisy query sees itself and clean keys at earlier positions
                expected = k == q or (k < T and pos[k] < pos[q])
            assert bool(mask[q, k]) == expected, (q, k)
    all_clean = stream_attention_mask(torch.arange(6), torch.ones(6, dtype=torch.bool), 6)
    assert torch.equal(all_clean, torch.ones(6, 6, dtype=torch.bool).tril())


def test_denoiser_causality_brute_force():
    """Changing clean token j never changes noisy logit i for j >= i-1... in window terms: the noisy
    position predicting x_i (i = 1..T) depends on x_0..x_{i-1} only, and on each of them."""
    block = randomize(PaperBlock(PAPER, V, 2, 0.5))
    T = 8
    g = torch.Generator().manual_seed(3)
    window = torch.randint(0, V, (1, T + 1), generator=g)
    z = torch.randn(1, T, CFG.embed_dim, generator=g)
    sigma = torch.tensor([0.7])
    _, base = block(window[:, :-1], z, sigma)
    for j in range(T):  # change context token x_j
        changed = window.clone()
        changed[0, j] = (changed[0, j] + 1) % V
        _, logits = block(changed[:, :-1], z, sigma)
        for i in range(T):  # output i predicts x_{i+1} from x_0..x_i
            diff = (logits[0, i] - base[0, i]).abs().max().item()
            if j > i:
                assert diff == 0.0, f"position {i} saw future token {j}"
            else:
                assert diff > 1e-5, f"position {i} ignored past token {j}"
    # and the noisy input at one position never leaks into another position
    z2 = z.clone()
    z2[0, 3] += 1.0
    _, logits = block(window[:, :-1], z2, sigma)
    changed_rows = (logits[0] - base[0]).abs().amax(-1) > 0
    assert changed_rows.tolist() == [i == 3 for i in range(T)]


def test_baseline_is_causal():
    model = randomize(LlamaLM(CFG, V))
    tokens = torch.randint(0, V, (1, 10))
    base = model(tokens)
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % V
    diff = (model(changed) - base).abs().amax(-1)[0]
    assert (diff[:6] == 0).all() and (diff[6:] > 1e-5).all()


def test_fresh_block_returns_c_skip_times_z():
    torch.manual_seed(0)
    block = PaperBlock(PAPER, V, 2, 0.5).eval()
    window = torch.randint(0, V, (3, 9))
    z = torch.randn(3, 8, CFG.embed_dim)
    sigma = torch.tensor([0.01, 0.5, 40.0])
    D, logits = block(window[:, :-1], z, sigma)
    c_skip = edm_precond(sigma, 0.5)[0].view(3, 1, 1)
    torch.testing.assert_close(D, c_skip * z, rtol=0, atol=0)
    assert torch.equal(logits, torch.zeros_like(logits))  # zero-init head: uniform prediction


@pytest.mark.parametrize("design", [PAPER, CFG], ids=["paper", "dbscale"])
def test_block_cached_forward_equals_full_forward(design):
    block = randomize(denoiser_block(design, V, 2, 0.5, TABLE)).double()
    E = TABLE.double()
    block.target_table = E if block.target_table is not None else None
    T = 7
    window = torch.randint(0, V, (1, T + 1))
    z = torch.randn(1, T, CFG.embed_dim, dtype=torch.float64)
    sigma = torch.tensor([0.3], dtype=torch.float64)
    _, full = block(window[:, :-1], z, sigma)
    from dbscale.models.layers import KVCache

    cache = KVCache()
    for i in range(T):  # feed clean x_i one at a time along with the noisy query for position i+1
        _, step = block(window[:, i : i + 1], z[:, i : i + 1], sigma, torch.tensor([i]), torch.tensor([i + 1]), cache)
        torch.testing.assert_close(step[0, 0], full[0, i], rtol=1e-9, atol=1e-9)
    assert len(cache) == T


def test_kv_cache_extend_matches_concatenation():
    """The in-place buffers against a brute-force record of every token kept: each call returns the kept tokens
    followed by the call's own, keeps only the first num_cacheable, and survives the buffer growing."""
    from dbscale.models.layers import KVCache

    g = torch.Generator().manual_seed(0)
    cache, kept_k, kept_v = KVCache(), torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4)
    for T, keep in [(5, 5), (2, 1), (1, 0), (3, 2), (9, 9), (2, 1), (1, 1)]:
        k, v = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 4, generator=g)
        got_k, got_v = cache.extend(0, k, v, keep)
        assert torch.equal(got_k, torch.cat([kept_k, k], dim=2)) and torch.equal(got_v, torch.cat([kept_v, v], dim=2))
        kept_k, kept_v = torch.cat([kept_k, k[:, :, :keep]], dim=2), torch.cat([kept_v, v[:, :, :keep]], dim=2)
        assert cache.lengths[0] == kept_k.shape[2]
    assert cache.keys[0].shape[2] >= kept_k.shape[2]


def test_block_keeps_its_time_conditioning_per_cache():
    """Without autograd, a cache keeps the block's sigma-only modulations: one time-embedder call per cache,
    outputs equal to the full forward; a different sigma on the same cache recomputes them."""
    from dbscale.models.layers import KVCache

    block = randomize(DenoiserBlock(CFG, V, 2, 0.5, TABLE)).double()
    block.target_table = TABLE.double()
    calls = []
    block.time_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    T, R = 6, 3
    window = torch.randint(0, V, (R, T + 1))
    z = torch.randn(R, T, CFG.embed_dim, dtype=torch.float64)
    sigma = torch.full((R,), 0.3, dtype=torch.float64)
    with torch.no_grad():
        _, full = block(window[:, :-1], z, sigma)
        calls.clear()
        cache = KVCache()
        for i in range(T):
            clean, noisy = torch.tensor([i]), torch.tensor([i + 1])
            _, step = block(window[:, i : i + 1], z[:, i : i + 1], sigma, clean, noisy, cache)
            torch.testing.assert_close(step[:, 0], full[:, i], rtol=1e-9, atol=1e-9)
        assert calls == [1]  # computed once, for one row, broadcast over the three
        other = torch.full((R,), 0.7, dtype=torch.float64)
        forgot = copy.deepcopy(cache)
        forgot.conditioning = None  # the same keys and values, nothing kept: computes at sigma 0.7
        args = (window[:, T : T + 1], z[:, :1], other, torch.tensor([T]), torch.tensor([T + 1]))
        _, moved = block(*args, cache)
        _, ref = block(*args, forgot)
        assert calls == [1, 1, 1]
        torch.testing.assert_close(moved, ref, rtol=0, atol=0)
        mixed = torch.tensor([0.3, 0.7, 0.3], dtype=torch.float64)  # rows at different sigmas: nothing kept
        block(window[:, :1], z[:, :1], mixed, torch.tensor([0]), torch.tensor([1]), KVCache())
        assert calls[-1] == R
    block(window[:, :1], z[:, :1], sigma, torch.tensor([0]), torch.tensor([1]), cache)  # with autograd: recomputed
    assert calls[-1] == R


def chain_model(num_blocks=2, steps=None, design=PAPER) -> DiffusionBlocksLM:
    cfg = Config(model=design)
    cfg.diffusion.num_blocks = num_blocks
    cfg.diffusion.sample_steps = steps
    model = DiffusionBlocksLM(cfg, V, frozen_target_embedding(V, CFG.embed_dim, 0))
    for b, block in enumerate(model.blocks):
        randomize(block, seed=b)
    return model.eval()


@pytest.mark.parametrize(
    "make", [lambda: randomize(LlamaLM(CFG, V)), lambda: chain_model(2), lambda: chain_model(2, 5)]
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached(make, temperature):
    model = make()
    prompt = [3, 14, 15, 9, 2]
    kw = dict(max_new_tokens=12, temperature=temperature, top_p=0.9, seed=7)
    cached = generate_ids(model, prompt, use_cache=True, **kw)
    uncached = generate_ids(model, prompt, use_cache=False, **kw)
    assert cached == uncached and len(cached) == 12


def test_teacher_forced_chain_equals_sequential_chain():
    """The batched teacher-forced evaluation and token-by-token generation are two implementations of one chain."""
    model = chain_model(2)
    window = torch.randint(0, V, (1, 9))
    z = torch.cat([model.start_noise(0, p) for p in range(1, 9)], dim=1)
    batched = model.teacher_forced_logits(window, z=z)
    cache = model.new_cache()
    for i in range(8):
        logits = model.next_token_logits(cache, window[:, i : i + 1], seed=0)
        torch.testing.assert_close(logits[0], batched[0, i], rtol=1e-4, atol=1e-4)


def test_denoiser_loss_weighting():
    block = randomize(PaperBlock(PAPER, V, 1, 0.5))
    E = frozen_target_embedding(V, CFG.embed_dim, 0)
    window = torch.randint(0, V, (2, 6))
    sigma, noise = torch.tensor([0.05, 2.0]), torch.randn(2, 5, CFG.embed_dim)
    weighted, ce = denoiser_loss(block, window, E, sigma, noise, "edm", 0.5)
    plain, ce2 = denoiser_loss(block, window, E, sigma, noise, "none", 0.5)
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert weighted.item() == pytest.approx((w * ce).mean().item(), rel=1e-5)
    assert plain.item() == pytest.approx(ce.mean().item(), rel=1e-5) and torch.equal(ce, ce2)


def test_target_embedding_is_seeded_and_unit_norm():
    a, b = frozen_target_embedding(50, 16, 3), frozen_target_embedding(50, 16, 3)
    assert torch.equal(a, b) and not torch.equal(a, frozen_target_embedding(50, 16, 4))
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(50))


def test_explicit_layer_allocation_builds_uneven_blocks():
    cfg = config_from_dict(
        {
            "model": {"n_layers": 4, "d_model": 32, "n_heads": 2},
            "diffusion": {"num_blocks": 3, "layers_per_block": [1, 2, 1]},
        }
    )
    model = DiffusionBlocksLM(cfg, V, frozen_target_embedding(V, 32, 0))
    assert [len(b.layers) for b in model.blocks] == [1, 2, 1]


def test_chain_diagnostics_follow_the_chain():
    """The diagnostics' chain column is the same chain as `teacher_forced_logits`: same start noise,
    same final cross-entropy."""
    import numpy as np

    from dbscale.generate import chain_diagnostics, heldout_metrics

    model = chain_model(2)
    windows = np.random.default_rng(0).integers(0, V, size=(3, 9))
    rows = chain_diagnostics(model, windows, seed=5)
    assert [r["block"] for r in rows] == model.step_blocks and rows[0]["sigma"] == model.sigmas[0]
    final = model.teacher_forced_logits(torch.from_numpy(windows), seed=5, temperature=0.0)
    targets = torch.from_numpy(windows)[:, 1:]
    ce = torch.nn.functional.cross_entropy(final.transpose(1, 2), targets).item()
    assert rows[-1]["chain_ce"] == pytest.approx(ce, rel=1e-4)
    metrics = heldout_metrics(model, windows, seed=5)
    assert metrics["ce"] is None and metrics["accuracy"] == pytest.approx((final.argmax(-1) == targets).float().mean())
    first = model.blocks[0](torch.from_numpy(windows)[:, :-1], model.window_draws(3, 8, 5)[0], torch.full((3,), 80.0))
    first_ce = torch.nn.functional.cross_entropy(first[1].transpose(1, 2), targets).item()
    assert metrics["first_step_ce"] == pytest.approx(first_ce, rel=1e-4)
    assert "prior_ce" not in rows[0]  # the paper's (edm) readout has no separate prior
    # dbscale's posterior readout: the block fed z = 0 gets no evidence, so its logits are its prior alone
    model = chain_model(2, design=CFG)
    rows = chain_diagnostics(model, windows, seed=5)
    for row in rows:
        s = torch.full((3,), row["sigma"])
        _, prior = model.blocks[row["block"]](torch.from_numpy(windows)[:, :-1], torch.zeros(3, 8, CFG.embed_dim), s)
        prior_ce = torch.nn.functional.cross_entropy(prior.transpose(1, 2), targets).item()
        assert row["prior_ce"] == pytest.approx(prior_ce, rel=1e-4)
        assert row["prior_accuracy"] == pytest.approx((prior.argmax(-1) == targets).float().mean().item())


def saved_activation_bytes(fn) -> int:
    """Bytes autograd saves for backward while fn runs (saved-tensor hooks)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("kind", ["e2e", "block", "paper block"])
def test_activation_checkpointing_same_gradients_less_saved_memory(kind):
    torch.manual_seed(0)
    design = PAPER if kind == "paper block" else CFG
    model = LlamaLM(CFG, V) if kind == "e2e" else denoiser_block(design, V, 2, 0.5, TABLE)
    randomize(model).train()
    window = torch.randint(0, V, (2, 17))
    E = frozen_target_embedding(V, CFG.embed_dim, 0)
    sigma, noise = torch.tensor([0.3, 2.0]), torch.randn(2, 16, CFG.embed_dim)
    grads, saved = {}, {}
    for ac in (False, True):
        model.activation_checkpointing = ac
        model.zero_grad()
        out = {}

        def step(out=out):
            if kind == "e2e":
                out["loss"] = torch.nn.functional.cross_entropy(
                    model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten()
                )
            else:
                out["loss"] = denoiser_loss(model, window, E, sigma, noise, "edm", 0.5)[0]

        saved[ac] = saved_activation_bytes(step)
        out["loss"].backward()
        grads[ac] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6, msg=n)
    assert saved[True] < 0.6 * saved[False]


@pytest.mark.parametrize(
    "kind, weights_abs_sum, next_draw",
    [("e2e", 682.2541492559558, 0.3746638894081116), ("block", 519.1299370001716, 0.0666610598564148)],
)
def test_initialisation_reproduces_earlier_runs(kind, weights_abs_sum, next_draw):
    """Golden values from dbscale before the Head module (commit f7d24a4): the same weights AND the same random
    state after construction, which the block job's later draws depend on (a changed draw order silently
    changed every block's training once)."""
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, ffn_multiple_of=32, seq_len=16)
    torch.manual_seed(0)
    paper = dataclasses.replace(cfg, block="paper")
    model = LlamaLM(cfg, 97) if kind == "e2e" else PaperBlock(paper, 97, 1, 0.5)
    assert sum(p.double().abs().sum().item() for p in model.parameters()) == pytest.approx(weights_abs_sum, rel=1e-12)
    assert torch.rand(1).item() == next_draw


@pytest.mark.parametrize("design", [CFG, PAPER], ids=["dbscale", "paper"])
@pytest.mark.parametrize("steps", [None, 5])
def test_chain_equals_a_hand_written_euler_chain(steps, design):
    """teacher_forced_logits against a second implementation of docs/METHOD.md 6 (mean estimate, Euler step),
    written out step by step: the same final logits, so skipping the unused last estimate changes nothing."""
    model = chain_model(2, design=design)
    if steps is not None:
        model.set_sample_steps(steps)
    window = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    context, E = window[:, :-1], model.target_embedding
    z = model.window_draws(2, 6, seed=9)[0]
    sigmas, blocks = model.sigmas, model.step_blocks
    with torch.no_grad():
        for k, (sigma, b) in enumerate(zip(sigmas, blocks, strict=True)):
            logits = model.blocks[b](context, z, torch.full((2,), sigma))[1].float()
            if k + 1 < len(sigmas):
                denoised = logits.softmax(-1) @ E
                z = z + (sigmas[k + 1] - sigma) * (z - denoised) / sigma
    got = model.teacher_forced_logits(window, seed=9, temperature=0.0)
    torch.testing.assert_close(got, logits)
