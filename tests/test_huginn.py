"""The Huginn family: truncated BPTT against a second implementation, memory that grows with k (baseline) and
does not exist for the diffusion core, cached generation, recurrence sampling, and a run through the tools."""

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers import huginn_cfg, normal_init
from helpers import run_cli as run

from dbscale.config import ConfigError
from dbscale.families import config_from_dict
from dbscale.generate import generate_ids
from dbscale.models.huginn import HuginnDenoiser, HuginnDiffusionLM, HuginnLM, causal_stack, sample_recurrence
from dbscale.models.llama import denoiser_loss, frozen_target_embedding
from dbscale.profiling import saved_activation_bytes

PY = sys.executable
V = 64


def reference_truncated_bptt(model, tokens, state, r, k):
    """Second implementation: run every iteration with a graph, detach the state before the last k."""
    cfg = model.cfg
    pos = torch.arange(tokens.shape[1])
    e = causal_stack(model.prelude, cfg, model.embed_tokens(tokens), pos)
    s = state
    for i in range(r):
        if i == r - k:
            s = s.detach()
        s = causal_stack(model.core, cfg, model.adapter(torch.cat([s, e], -1)), pos)
    return model.lm_head(model.norm(causal_stack(model.coda, cfg, s, pos)))


@pytest.mark.parametrize("r,k", [(5, 2), (3, 3), (2, 6)])
def test_truncated_bptt_gradients_match_a_detached_reference(r, k):
    model = normal_init(HuginnLM(huginn_cfg().model, V))
    tokens = torch.randint(0, V, (2, 12))
    state = torch.randn(2, 12, 32)
    model(tokens, iterations=r, bptt=k, state=state).square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_truncated_bptt(model, tokens, state, r, min(k, r)).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)
    if k < r:  # the prelude still learns through the adapter of the last k iterations
        assert ours["prelude.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_baseline_activation_memory_grows_with_k_and_the_diffusion_core_has_no_recurrence():
    cfg = huginn_cfg()
    model = normal_init(HuginnLM(cfg.model, V))
    tokens = torch.randint(0, V, (2, 16))
    held = list(model.parameters())
    saved = {}
    for k in (1, 2, 4):
        saved[k] = saved_activation_bytes(lambda k=k: model(tokens, iterations=4, bptt=k).sum(), held)["bytes"]
    per_iteration = saved[2] - saved[1]
    assert per_iteration > 0 and saved[4] - saved[2] == pytest.approx(2 * per_iteration, rel=0.01)
    table = frozen_target_embedding(V, 32, 0)
    block = HuginnDenoiser(cfg.model, V, 0.5, table)
    window = torch.randint(0, V, (2, 17))

    def step():
        return denoiser_loss(block, window, table, torch.ones(2), torch.randn(2, 16, 32), "edm", 0.5)[0]

    one_pass = saved_activation_bytes(step, list(block.parameters()))["bytes"]
    assert 0 < one_pass < saved[4]  # one pass of 6 layers over 2T positions < 4 iterations of the core


def test_cached_generation_equals_uncached_for_baseline_and_diffusion_core():
    cfg = huginn_cfg()
    baseline = normal_init(HuginnLM(cfg.model, V)).eval()
    chain = normal_init(HuginnDiffusionLM(cfg, V, frozen_target_embedding(V, 32, 0))).eval()
    for model in (baseline, chain):
        a = generate_ids(model, [1, 2, 3], 8, use_cache=True, seed=4)
        b = generate_ids(model, [1, 2, 3], 8, use_cache=False, seed=4)
        assert a == b and len(a) == 8
    assert len(chain.sigmas) == 6  # K = diffusion.sample_steps Euler steps per token


def test_recurrence_sampling_has_the_configured_mean():
    rng = np.random.default_rng(0)
    draws = np.array([sample_recurrence(rng, 32, 0.5) for _ in range(20000)])
    assert draws.min() >= 1 and draws.mean() == pytest.approx(33, rel=0.02)


def test_huginn_config_errors():
    with pytest.raises(ConfigError, match="model.n_layers: a Huginn model is prelude \\+ core \\+ coda"):
        huginn_cfg(n_layers=6)
    with pytest.raises(ConfigError, match=r"model\.huginn\.bptt_steps"):
        huginn_cfg(bptt_steps=0)
    with pytest.raises(ConfigError, match="diffusion.sample_steps"):
        config_from_dict(
            {
                "model": {"family": "huginn", "n_layers": 8, "d_model": 32, "n_heads": 2},
                "diffusion": {"num_blocks": 2, "sample_steps": 1},
            }
        )


@pytest.mark.slow
def test_huginn_run_trains_both_merges_generates_and_refuses_the_wrong_family(tmp_path, speeches):
    from dbscale.errors import RunError
    from dbscale.merge import load_merged

    cfg = {
        "name": "huginn-test",
        "model": {
            "family": "huginn",
            "n_layers": 8,
            "d_model": 32,
            "n_heads": 2,
            "ffn_multiple_of": 32,
            "seq_len": 32,
            "huginn": {"mean_recurrence": 3, "bptt_steps": 2},
        },
        "diffusion": {"num_blocks": 2, "sample_steps": 4},
        "data": {
            "source": "files",
            "paths": [str(p) for p in speeches[:8]],
            "vocab_size": 512,
            "val_fraction": 0.2,
            "tokenizer_train_chars": 300000,
        },
        "train": {
            "steps": 3,
            "micro_batch": 4,
            "lr": 1e-3,
            "warmup_steps": 1,
            "log_every": 1,
            "val_every": 3,
            "val_batches": 2,
            "save_every": 3,
        },
    }
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = tmp_path / "run"
    run([PY, "tools/prepare.py", "--config", str(path), "--run", str(r)])
    for b in range(2):
        run([PY, "launchers/train_block.py", "--run", str(r), "--block", str(b)])
    run([PY, "launchers/train_e2e.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r)])
    run([PY, "tools/merge_blocks.py", "--run", str(r), "--e2e"])
    for model in ("merged", "e2e/merged"):
        out = run(
            [
                PY,
                "tools/generate.py",
                "--model",
                str(r / model),
                "--prompt",
                "The",
                "--max-new-tokens",
                "5",
                "--format",
                "jsonl",
                "--heldout",
                str(r),
                "--heldout-windows",
                "4",
            ]
        )
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        ce = lines[1]["ce"] if model == "e2e/merged" else lines[1]["first_step_ce"]  # a chain's last step: one-hot
        assert lines[0]["new_tokens"] == 5 and 0 < ce < 10 and 0 <= lines[1]["sample_accuracy"] <= 1
    model, _, manifest = load_merged(r / "merged", family="huginn")
    assert isinstance(model, HuginnDiffusionLM) and model.step_blocks == [0, 0, 1, 1]
    with pytest.raises(RunError, match="a merged 'huginn' model, but a 'llama' model is needed"):
        load_merged(r / "merged", family="llama")


@pytest.mark.parametrize("sigma_free", [False, True], ids=["noise-conditioned", "sigma-free"])
def test_single_stream_core_chain_teacher_forced_equals_cached_generation(sigma_free):
    """model.block stream for the Huginn core: core + coda run once over the prelude's features. Token-by-token
    generation with caches (one per step, or one per block for a sigma-free core) and the batched teacher-forced
    chain are two implementations of the same chain."""
    cfg = huginn_cfg(block="stream", time_conditioning=not sigma_free)
    chain = normal_init(HuginnDiffusionLM(cfg, V, frozen_target_embedding(V, 32, 0))).eval()
    assert chain.sigma_free == sigma_free
    assert len(chain.new_cache()) == (1 if sigma_free else len(chain.sigmas))
    window = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    batched = chain.teacher_forced_logits(window, seed=0)
    cache = chain.new_cache()
    for i in range(8):
        logits = chain.next_token_logits(cache, window[:, i : i + 1], seed=0)
        torch.testing.assert_close(logits[0], batched[0, i], rtol=1e-4, atol=1e-2)
        assert logits[0].argmax() == batched[0, i].argmax()


def test_sigma_free_core_logits_are_its_prior_plus_the_evidence_at_every_sigma():
    """A sigma-free single-stream core: logits(context, z, sigma) - <z, E_v> / sigma^2 is one prior, the same at
    every sigma, and it is the core's own head over the prelude -> core -> coda states of the clean tokens."""
    cfg = huginn_cfg(block="stream", time_conditioning=False)
    table = frozen_target_embedding(V, 32, 0).double()
    block = normal_init(HuginnDenoiser(cfg.model, V, 0.5, table)).double().eval()  # fp64: evidence at 1e4
    window = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    z = torch.randn(2, 8, 32, dtype=torch.float64)
    priors = []
    for s in (0.01, 0.7, 30.0):
        sigma = torch.full((2,), s, dtype=torch.float64)
        _, logits = block(window[:, :-1], z, sigma)
        priors.append(logits - (z / s**2) @ table.T)
    for prior in priors[1:]:
        torch.testing.assert_close(prior, priors[0], rtol=1e-7, atol=1e-7)
    with torch.no_grad():
        by_hand = block.lm_head(block.hidden(window[:, :-1]))
    torch.testing.assert_close(priors[1], by_hand, rtol=1e-7, atol=1e-7)
