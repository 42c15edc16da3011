"""The memory switches of a block job: each keeps the math (checked against the plain computation) and
removes what it claims to remove (measured with saved-tensor hooks and tensor byte counts)."""

import pytest
import torch
import torch.nn.functional as F

from dbscale.config import ModelConfig
from dbscale.models.llama import DenoiserBlock, LlamaLM, denoiser_loss, frozen_target_embedding, lm_loss
from dbscale.profiling import saved_activation_bytes, state_bytes

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, ffn_multiple_of=32, seq_len=24)
V = 97


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def grads_of(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_ce_equals_full_logits_for_the_baseline(chunk):
    model = randomize(LlamaLM(CFG, V)).double()  # float64: any difference is a bug, not rounding
    window = torch.randint(0, V, (3, 17))
    ref_loss, ref = grads_of(
        model, lambda: F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
    )
    loss, got = grads_of(model, lambda: lm_loss(model, window, ce_chunk=chunk))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("head", ["learned", "target"])
@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_ce_equals_full_logits_for_a_block(head, chunk):
    cfg = ModelConfig(**{**CFG.__dict__, "head": head})
    E = frozen_target_embedding(V, cfg.embed_dim, 0).double()
    block = randomize(DenoiserBlock(cfg, V, 2, 0.5, E)).double()  # float64: any difference is a bug, not rounding
    window = torch.randint(0, V, (2, 17))
    sigma, noise = torch.tensor([0.3, 2.0], dtype=torch.float64), torch.randn(2, 16, cfg.embed_dim).double()

    def reference():
        z = E[window[:, 1:]] + sigma.view(-1, 1, 1) * noise
        _, logits = block(window[:, :-1], z, sigma)
        ce = F.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none").mean(1)
        return ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * ce).mean()

    ref_loss, ref = grads_of(block, reference)
    loss, got = grads_of(block, lambda: denoiser_loss(block, window, E, sigma, noise, "edm", 0.5, chunk)[0])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)


def test_chunked_ce_never_saves_the_full_logits():
    vocab = 500  # large enough that the logits are the biggest activation, as at a 32K vocabulary
    model = randomize(LlamaLM(CFG, vocab))
    window = torch.randint(0, vocab, (4, 25))
    params = list(model.parameters())
    full = saved_activation_bytes(lambda: lm_loss(model, window), params)
    chunked = saved_activation_bytes(lambda: lm_loss(model, window, ce_chunk=8), params)
    logits_bytes = 4 * 24 * vocab * 4
    assert full["largest"] >= logits_bytes  # the (B*T, V) log-softmax is kept for backward
    assert chunked["largest"] < logits_bytes / 4
    assert chunked["bytes"] < full["bytes"] - logits_bytes


def test_target_head_reads_the_frozen_table_and_owns_no_vocabulary_weights():
    E = frozen_target_embedding(V, CFG.embed_dim, 3)
    learned = DenoiserBlock(CFG, V, 1, 0.5, E)
    target = randomize(DenoiserBlock(ModelConfig(**{**CFG.__dict__, "head": "target"}), V, 1, 0.5, E))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(learned) - n(target) == V * CFG.embed_dim - 1  # the V x e head, less one trained scale
    assert "target_table" not in target.state_dict()  # the run's table is not saved with each block
    h = torch.randn(2, 5, CFG.embed_dim)
    torch.testing.assert_close(target.lm_head(h, table=E), target.lm_head.logit_scale * h @ E.T)
    fresh = DenoiserBlock(ModelConfig(**{**CFG.__dict__, "head": "target"}), V, 1, 0.5, E)
    z = torch.randn(1, 4, CFG.embed_dim)
    _, logits = fresh(torch.randint(0, V, (1, 4)), z, torch.tensor([2.0]))
    # zero scale: the network adds nothing (uniform prior); the posterior readout leaves the Gaussian evidence
    torch.testing.assert_close(logits, z @ E.T / 4.0)


def test_target_context_embedding_projects_the_frozen_table():
    E = frozen_target_embedding(V, CFG.embed_dim, 3)
    cfg = ModelConfig(**{**CFG.__dict__, "context_embedding": "target"})
    block = randomize(DenoiserBlock(cfg, V, 1, 0.5, E))
    assert not hasattr(block, "embed_tokens")
    tokens = torch.randint(0, V, (2, 6))
    torch.testing.assert_close(block.embed_context(tokens), E[tokens] @ block.ctx_proj.weight.T)
    with pytest.raises(ValueError, match="needs the"):
        DenoiserBlock(cfg, V, 1, 0.5)


def test_target_switches_remove_vocabulary_state_from_a_training_step():
    E = frozen_target_embedding(V, CFG.embed_dim, 3)
    out = {}
    for name, extra in (("paper", {}), ("target", {"head": "target", "context_embedding": "target"})):
        block = DenoiserBlock(ModelConfig(**{**CFG.__dict__, **extra}), V, 1, 0.5, E)
        opt = torch.optim.AdamW(block.parameters())
        window = torch.randint(0, V, (2, 9))
        loss, _ = denoiser_loss(
            block, window, E, torch.tensor([0.5, 1.0]), torch.randn(2, 8, CFG.embed_dim), "edm", 0.5
        )
        loss.backward()
        opt.step()
        out[name] = state_bytes(block, opt)
    vocab_params = V * CFG.embed_dim + V * CFG.d_model - CFG.embed_dim * CFG.d_model - 1
    assert out["paper"]["parameters"] - out["target"]["parameters"] == 4 * vocab_params
    assert out["paper"]["gradients"] - out["target"]["gradients"] == 4 * vocab_params
    assert out["paper"]["optimizer"] - out["target"]["optimizer"] == 8 * vocab_params  # AdamW: two moments
